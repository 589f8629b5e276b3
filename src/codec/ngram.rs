//! Token n-gram counts over hashed contexts, orders 1..=N, built online per chunk.

use std::collections::HashMap;

/// Counts of next symbols after one context. Small: a chunk has a few thousand tokens.
#[derive(Default, Clone)]
pub struct Counts {
    pub total: u32,
    pub entries: Vec<(u32, u32)>,
}

impl Counts {
    pub fn count(&self, sym: u32) -> u32 {
        self.entries
            .iter()
            .find(|(s, _)| *s == sym)
            .map_or(0, |(_, c)| *c)
    }

    /// Shannon entropy of the empirical distribution, in bits (pinned `log2`).
    pub fn entropy_bits(&self) -> f64 {
        let n = self.total as f64;
        let mut h = 0.0;
        for &(_, c) in &self.entries {
            let p = c as f64 / n;
            h -= p * libm::log2(p);
        }
        h
    }
}

pub struct NGram {
    order: usize,
    tables: Vec<HashMap<u64, Counts>>,
}

/// FNV-1a over the last `k` history ids: deterministic on every platform.
pub fn context_hash(history: &[u32], k: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ k as u64;
    for &s in &history[history.len() - k..] {
        for b in s.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

impl NGram {
    pub fn new(order: usize) -> NGram {
        NGram {
            order,
            tables: (0..order).map(|_| HashMap::new()).collect(),
        }
    }

    pub fn order(&self) -> usize {
        self.order
    }

    /// Counts after the last `k` ids of `history` (k in 1..=order), if that context was seen.
    pub fn lookup(&self, history: &[u32], k: usize) -> Option<&Counts> {
        if history.len() < k {
            return None;
        }
        self.tables[k - 1].get(&context_hash(history, k))
    }

    /// Record that `sym` (an alphabet symbol) followed the current contexts of `history`.
    pub fn update(&mut self, history: &[u32], sym: u32) {
        for k in 1..=self.order.min(history.len()) {
            let counts = self.tables[k - 1]
                .entry(context_hash(history, k))
                .or_default();
            counts.total += 1;
            match counts.entries.iter_mut().find(|(s, _)| *s == sym) {
                Some((_, c)) => *c += 1,
                None => counts.entries.push((sym, 1)),
            }
        }
    }
}
