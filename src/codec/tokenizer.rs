//! Text ⇄ symbols, exactly invertible.
//!
//! SmolLM2 is a byte-level BPE, but its vocabulary has no token for 21 byte values and a
//! tokenizer turns invalid UTF-8 into U+FFFD: both would silently lose bytes. So the coder
//! works on *symbols*: a BPE token, or an escaped raw byte. Every clean run of text is
//! tokenized and the result verified against the bytes it came from; anything that does
//! not reproduce exactly is escaped byte by byte. Decoding never consults llama.cpp's
//! detokenizer (known to drop content for some whitespace tokens): token bytes come
//! straight from the vocabulary strings through the GPT-2 byte⇄char table.

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{PreTokenizerWrapper, Tokenizer};

/// A coded unit: a vocabulary token, or one raw byte behind the escape token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Symbol {
    Token(u32),
    Escaped(u8),
}

/// The vocabulary as stored in a GGUF file.
#[derive(Debug, Clone)]
pub struct Vocabulary {
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    /// llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_types: Vec<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("the model's vocabulary is not byte-level BPE: {0}")]
    Unsupported(String),
    #[error("cannot build the tokenizer: {0}")]
    Build(String),
}

pub struct TextTokenizer {
    bpe: Tokenizer,
    token_bytes: Vec<Box<[u8]>>,
    /// Tokens the tokenizer can produce from text; the rest (control tokens, tokens whose
    /// strings are not byte-level) get only the probability floor.
    producible: Vec<bool>,
    byte_has_token: [bool; 256],
    escape_token: u32,
}

/// GPT-2's reversible map from bytes to printable characters.
pub fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            b
        } else {
            let c = next;
            next += 1;
            c
        };
        table[b as usize] = char::from_u32(c).unwrap_or('\0');
    }
    table
}

impl TextTokenizer {
    pub fn new(vocab: &Vocabulary, escape_token: u32) -> Result<TextTokenizer, TokenizerError> {
        let table = byte_to_char_table();
        let mut char_to_byte = std::collections::HashMap::new();
        for (b, c) in table.iter().enumerate() {
            char_to_byte.insert(*c, b as u8);
        }
        let n = vocab.tokens.len();
        if n == 0 || escape_token as usize >= n {
            return Err(TokenizerError::Unsupported("empty vocabulary".into()));
        }
        let mut token_bytes = Vec::with_capacity(n);
        let mut producible = vec![false; n];
        let mut byte_has_token = [false; 256];
        let mut bpe_vocab = Vocab::default();
        for (id, s) in vocab.tokens.iter().enumerate() {
            let ty = vocab.token_types.get(id).copied().unwrap_or(1);
            let bytes: Option<Vec<u8>> = s.chars().map(|c| char_to_byte.get(&c).copied()).collect();
            let bytes = match (ty, bytes) {
                (1, Some(b)) if !b.is_empty() => b,
                _ => Vec::new(),
            };
            if !bytes.is_empty() {
                producible[id] = true;
                if bytes.len() == 1 {
                    byte_has_token[bytes[0] as usize] = true;
                }
            }
            token_bytes.push(bytes.into_boxed_slice());
            bpe_vocab.insert(s.clone(), id as u32);
        }
        if byte_has_token.iter().filter(|&&b| b).count() < 128 {
            return Err(TokenizerError::Unsupported(
                "fewer than 128 single-byte tokens; expected a GPT-2 style byte-level BPE".into(),
            ));
        }
        let mut merges = Vec::with_capacity(vocab.merges.len());
        for m in &vocab.merges {
            let mut parts = m.splitn(2, ' ');
            match (parts.next(), parts.next()) {
                (Some(a), Some(b)) => merges.push((a.to_string(), b.to_string())),
                _ => return Err(TokenizerError::Build(format!("malformed merge {m:?}"))),
            }
        }
        let model = BPE::builder()
            .vocab_and_merges(bpe_vocab, merges)
            .build()
            .map_err(|e| TokenizerError::Build(e.to_string()))?;
        let mut bpe = Tokenizer::new(model);
        // SmolLM2's pre-tokenizer: individual digits, then GPT-2 byte-level splitting
        // without a prefix space.
        bpe.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, true)),
        ]))));
        Ok(TextTokenizer {
            bpe,
            token_bytes,
            producible,
            byte_has_token,
            escape_token,
        })
    }

    pub fn n_vocab(&self) -> usize {
        self.token_bytes.len()
    }

    pub fn escape_token(&self) -> u32 {
        self.escape_token
    }

    pub fn producible(&self) -> &[bool] {
        &self.producible
    }

    /// The bytes of a token, or `None` for a token text can never produce.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        match self.token_bytes.get(id as usize) {
            Some(b) if !b.is_empty() => Some(b),
            _ => None,
        }
    }

    /// Plain BPE token ids of a clean string (no escaping, no verification).
    pub fn bpe_ids(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .bpe
            .encode(text, false)
            .map_err(|e| TokenizerError::Build(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Split bytes into symbols that reproduce them exactly.
    pub fn encode(&self, bytes: &[u8]) -> Vec<Symbol> {
        let mut out = Vec::with_capacity(bytes.len() / 3 + 4);
        let mut i = 0;
        while i < bytes.len() {
            let end = self.clean_run_end(bytes, i);
            if end == i {
                out.push(Symbol::Escaped(bytes[i]));
                i += 1;
                continue;
            }
            self.encode_clean(&bytes[i..end], &mut out);
            i = end;
        }
        out
    }

    /// End of the longest prefix of `bytes[start..]` that is valid UTF-8 and uses only
    /// bytes the vocabulary has tokens for.
    fn clean_run_end(&self, bytes: &[u8], start: usize) -> usize {
        let mut p = start;
        while p < bytes.len() {
            let len = utf8_char_len(&bytes[p..]);
            if len == 0
                || !bytes[p..p + len]
                    .iter()
                    .all(|&b| self.byte_has_token[b as usize])
            {
                break;
            }
            p += len;
        }
        p
    }

    fn encode_clean(&self, run: &[u8], out: &mut Vec<Symbol>) {
        let verified = std::str::from_utf8(run)
            .ok()
            .and_then(|s| self.bpe_ids(s).ok())
            .filter(|ids| self.reproduces(ids, run));
        match verified {
            Some(ids) => out.extend(ids.into_iter().map(Symbol::Token)),
            None => {
                log::warn!(
                    "tokenizer did not reproduce a {}-byte run exactly; escaping it",
                    run.len()
                );
                out.extend(run.iter().map(|&b| Symbol::Escaped(b)));
            }
        }
    }

    fn reproduces(&self, ids: &[u32], run: &[u8]) -> bool {
        let mut pos = 0;
        for &id in ids {
            if id == self.escape_token
                || !self.producible.get(id as usize).copied().unwrap_or(false)
            {
                return false;
            }
            let b = &self.token_bytes[id as usize];
            if run.len() < pos + b.len() || run[pos..pos + b.len()] != b[..] {
                return false;
            }
            pos += b.len();
        }
        pos == run.len()
    }

    /// Bytes of a symbol sequence (the inverse of [`encode`](Self::encode)).
    pub fn decode_into(&self, symbol: Symbol, out: &mut Vec<u8>) -> bool {
        match symbol {
            Symbol::Escaped(b) => {
                out.push(b);
                true
            }
            Symbol::Token(id) => match self.token_bytes(id) {
                Some(b) if id != self.escape_token => {
                    out.extend_from_slice(b);
                    true
                }
                _ => false,
            },
        }
    }
}

/// Length of the valid UTF-8 character at the start of `b`, or 0 if there is none.
fn utf8_char_len(b: &[u8]) -> usize {
    let n = match b.first() {
        Some(0x00..=0x7F) => 1,
        Some(0xC2..=0xDF) => 2,
        Some(0xE0..=0xEF) => 3,
        Some(0xF0..=0xF4) => 4,
        _ => return 0,
    };
    if b.len() >= n && std::str::from_utf8(&b[..n]).is_ok() {
        n
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection() {
        let t = byte_to_char_table();
        let mut seen = std::collections::HashSet::new();
        for c in t {
            assert!(seen.insert(c));
        }
        assert_eq!(t[b'A' as usize], 'A');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
    }
}
