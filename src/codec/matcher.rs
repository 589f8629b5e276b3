//! Match model: follows the most recent earlier occurrence of the current context and
//! predicts the symbol that came after it. Strong on repeated names, boilerplate, lists.

use std::collections::HashMap;

use super::ngram::context_hash;

pub struct MatchModel {
    min_len: usize,
    last_seen: HashMap<u64, u32>,
    /// Index into history of the predicted next symbol, and how many symbols matched.
    ptr: Option<usize>,
    len: usize,
}

const MAX_VERIFY: usize = 64;

impl MatchModel {
    pub fn new(min_len: usize) -> MatchModel {
        MatchModel {
            min_len,
            last_seen: HashMap::new(),
            ptr: None,
            len: 0,
        }
    }

    /// Predicted next history id and current match length.
    pub fn predict(&self, history: &[u32]) -> Option<(u32, usize)> {
        let p = self.ptr?;
        history.get(p).map(|&s| (s, self.len))
    }

    /// Call after `history` has been extended by one symbol.
    pub fn update(&mut self, history: &[u32]) {
        let n = history.len();
        let last = history[n - 1];
        if let Some(p) = self.ptr {
            if history[p] == last && p + 1 < n {
                self.ptr = Some(p + 1);
                self.len += 1;
            } else {
                self.ptr = None;
                self.len = 0;
            }
        }
        if n < self.min_len {
            return;
        }
        let h = context_hash(history, self.min_len);
        if self.ptr.is_none() {
            if let Some(&cand) = self.last_seen.get(&h) {
                let cand = cand as usize;
                // Verify (hashes collide) and measure the real match length.
                let mut len = 0;
                while len < MAX_VERIFY
                    && len < cand
                    && history[cand - 1 - len] == history[n - 1 - len]
                {
                    len += 1;
                }
                if len >= self.min_len {
                    self.ptr = Some(cand);
                    self.len = len;
                }
            }
        }
        self.last_seen.insert(h, n as u32);
    }
}
