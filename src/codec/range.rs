//! 32-bit binary arithmetic coder (Witten–Neal–Cleary style, with pending "underflow" bits
//! instead of carries). Frequencies may total at most 2^24: after normalisation the
//! interval is wider than 2^30, so every symbol with frequency ≥ 1 keeps ≥ 64 units.

const TOP: u64 = 1 << 32;
const HALF: u64 = 1 << 31;
const QUARTER: u64 = 1 << 30;
pub const MAX_TOTAL: u32 = 1 << 24;

pub struct Encoder {
    low: u64,
    high: u64,
    pending: u64,
    out: Vec<u8>,
    bit_buf: u8,
    bit_count: u8,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    pub fn new() -> Encoder {
        Encoder {
            low: 0,
            high: TOP - 1,
            pending: 0,
            out: Vec::new(),
            bit_buf: 0,
            bit_count: 0,
        }
    }

    /// Encode the symbol occupying `[cum, cum + freq)` out of `total`.
    pub fn encode(&mut self, cum: u32, freq: u32, total: u32) {
        debug_assert!(freq > 0 && total <= MAX_TOTAL && cum + freq <= total);
        let range = self.high - self.low + 1;
        self.high = self.low + range * (cum + freq) as u64 / total as u64 - 1;
        self.low += range * cum as u64 / total as u64;
        loop {
            if self.high < HALF {
                self.emit_with_pending(0);
            } else if self.low >= HALF {
                self.emit_with_pending(1);
                self.low -= HALF;
                self.high -= HALF;
            } else if self.low >= QUARTER && self.high < HALF + QUARTER {
                self.pending += 1;
                self.low -= QUARTER;
                self.high -= QUARTER;
            } else {
                break;
            }
            self.low <<= 1;
            self.high = (self.high << 1) | 1;
        }
    }

    fn emit_with_pending(&mut self, bit: u8) {
        self.emit(bit);
        while self.pending > 0 {
            self.emit(bit ^ 1);
            self.pending -= 1;
        }
    }

    fn emit(&mut self, bit: u8) {
        self.bit_buf = (self.bit_buf << 1) | bit;
        self.bit_count += 1;
        if self.bit_count == 8 {
            self.out.push(self.bit_buf);
            self.bit_buf = 0;
            self.bit_count = 0;
        }
    }

    pub fn finish(mut self) -> Vec<u8> {
        // Two more bits pin a point inside [low, high]; the decoder reads zeros past the end.
        self.pending += 1;
        if self.low < QUARTER {
            self.emit_with_pending(0);
        } else {
            self.emit_with_pending(1);
        }
        if self.bit_count > 0 {
            let shift = 8 - self.bit_count;
            self.out.push(self.bit_buf << shift);
        }
        self.out
    }
}

pub struct Decoder {
    low: u64,
    high: u64,
    value: u64,
    data: Vec<u8>,
    bit_pos: usize,
}

impl Decoder {
    pub fn new(data: Vec<u8>) -> Decoder {
        let mut d = Decoder {
            low: 0,
            high: TOP - 1,
            value: 0,
            data,
            bit_pos: 0,
        };
        for _ in 0..32 {
            d.value = (d.value << 1) | d.next_bit();
        }
        d
    }

    fn next_bit(&mut self) -> u64 {
        let byte = self.bit_pos >> 3;
        let bit = match self.data.get(byte) {
            Some(b) => (b >> (7 - (self.bit_pos & 7))) & 1,
            None => 0,
        };
        self.bit_pos += 1;
        bit as u64
    }

    /// Whether the decoder has read more than a few bytes past its input: a sign of a
    /// corrupt stream (a valid one ends within the encoder's final bits).
    pub fn overran(&self) -> bool {
        self.bit_pos > self.data.len() * 8 + 64
    }

    /// The cumulative-frequency point the next symbol covers; find the symbol with
    /// `cum <= target < cum + freq`, then call [`consume`](Self::consume).
    pub fn target(&self, total: u32) -> u32 {
        let range = self.high - self.low + 1;
        let offset = self.value.wrapping_sub(self.low) & (TOP - 1);
        let t = ((offset + 1) * total as u64 - 1) / range;
        // A corrupt stream can place value outside what any symbol covers; clamp so the
        // caller's search stays in bounds (the checksum reports the damage).
        t.min(total as u64 - 1) as u32
    }

    pub fn consume(&mut self, cum: u32, freq: u32, total: u32) {
        let range = self.high - self.low + 1;
        self.high = self.low + range * (cum + freq) as u64 / total as u64 - 1;
        self.low += range * cum as u64 / total as u64;
        loop {
            if self.high < HALF {
                // nothing to subtract
            } else if self.low >= HALF {
                self.low -= HALF;
                self.high -= HALF;
                self.value = self.value.wrapping_sub(HALF);
            } else if self.low >= QUARTER && self.high < HALF + QUARTER {
                self.low -= QUARTER;
                self.high -= QUARTER;
                self.value = self.value.wrapping_sub(QUARTER);
            } else {
                break;
            }
            self.low <<= 1;
            self.high = (self.high << 1) | 1;
            self.value = ((self.value << 1) | self.next_bit()) & (TOP - 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(symbols: &[(u32, u32, u32)]) {
        let mut enc = Encoder::new();
        for &(c, f, t) in symbols {
            enc.encode(c, f, t);
        }
        let bytes = enc.finish();
        let mut dec = Decoder::new(bytes);
        for &(c, f, t) in symbols {
            let target = dec.target(t);
            assert!(
                target >= c && target < c + f,
                "target {target} not in [{c},{})",
                c + f
            );
            dec.consume(c, f, t);
        }
    }

    #[test]
    fn extreme_frequencies() {
        let total = MAX_TOTAL;
        let mut s = Vec::new();
        for i in 0..2000u32 {
            // alternate near-certain and near-impossible symbols
            if i % 3 == 0 {
                s.push((total - 1, 1, total));
            } else if i % 3 == 1 {
                s.push((0, 1, total));
            } else {
                s.push((1, total - 1, total));
            }
        }
        roundtrip(&s);
    }

    proptest! {
        #[test]
        fn random_streams_roundtrip(raw in proptest::collection::vec((any::<u32>(), any::<u32>(), 1u32..=MAX_TOTAL), 0..500)) {
            let s: Vec<_> = raw.into_iter().map(|(a, b, total)| {
                let c = a % total;
                let f = 1 + b % (total - c);
                (c, f, total)
            }).collect();
            roundtrip(&s);
        }
    }
}
