//! A small reader for the GGUF header: the key/value metadata only, never the tensors.
//!
//! We need the vocabulary and merges (to build the tokenizer without network access),
//! the weights type (to refuse models that break batch invariance) and a few names.
//! llama.cpp's own `meta_val_str` cannot return arrays, hence this reader.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::Path;

/// One metadata value. Arrays of scalars we do not need are kept only as their length.
#[derive(Debug, Clone)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    IntArray(Vec<i64>),
    OtherArray(u64),
}

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{0}: cannot read: {1}")]
    Io(String, std::io::Error),
    #[error("{0}: not a GGUF file (bad magic)")]
    BadMagic(String),
    #[error("{0}: unsupported GGUF version {1}")]
    Version(String, u32),
    #[error("{0}: corrupt GGUF metadata: {1}")]
    Corrupt(String, &'static str),
}

#[derive(Debug, Default)]
pub struct Metadata {
    pub values: HashMap<String, Value>,
}

// Bounds that keep a hostile or truncated file from making us allocate without limit.
const MAX_STRING: u64 = 1 << 20;
const MAX_ARRAY: u64 = 1 << 24;
const MAX_KV: u64 = 1 << 16;

impl Metadata {
    pub fn read(path: &Path) -> Result<Metadata, GgufError> {
        let name = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| GgufError::Io(name.clone(), e))?;
        let mut r = Reader {
            inner: BufReader::with_capacity(1 << 20, file),
            name: name.clone(),
        };
        let magic = r.bytes4()?;
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic(name));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version(name, version));
        }
        let _n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        if n_kv > MAX_KV {
            return Err(GgufError::Corrupt(name, "too many metadata keys"));
        }
        let mut values = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty)?;
            values.insert(key, value);
        }
        Ok(Metadata { values })
    }

    pub fn get_int(&self, key: &str) -> Option<i64> {
        match self.values.get(key) {
            Some(Value::Int(v)) => Some(*v),
            _ => None,
        }
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        match self.values.get(key) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    pub fn get_str_array(&self, key: &str) -> Option<&[String]> {
        match self.values.get(key) {
            Some(Value::StrArray(v)) => Some(v),
            _ => None,
        }
    }

    pub fn get_int_array(&self, key: &str) -> Option<&[i64]> {
        match self.values.get(key) {
            Some(Value::IntArray(v)) => Some(v),
            _ => None,
        }
    }
}

struct Reader<R: Read> {
    inner: R,
    name: String,
}

impl<R: Read> Reader<R> {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), GgufError> {
        self.inner
            .read_exact(buf)
            .map_err(|e| GgufError::Io(self.name.clone(), e))
    }
    fn bytes4(&mut self) -> Result<[u8; 4], GgufError> {
        let mut b = [0u8; 4];
        self.fill(&mut b)?;
        Ok(b)
    }
    fn u8(&mut self) -> Result<u8, GgufError> {
        let mut b = [0u8; 1];
        self.fill(&mut b)?;
        Ok(b[0])
    }
    fn u16(&mut self) -> Result<u16, GgufError> {
        let mut b = [0u8; 2];
        self.fill(&mut b)?;
        Ok(u16::from_le_bytes(b))
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes4()?))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        let mut b = [0u8; 8];
        self.fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn string(&mut self) -> Result<String, GgufError> {
        let len = self.u64()?;
        if len > MAX_STRING {
            return Err(GgufError::Corrupt(self.name.clone(), "string too long"));
        }
        let mut buf = vec![0u8; len as usize];
        self.fill(&mut buf)?;
        // Vocabulary entries are UTF-8 by the GGUF spec; keep going on a bad one.
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    fn scalar(&mut self, ty: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::Int(self.u8()? as i64),
            1 => Value::Int(self.u8()? as i8 as i64),
            2 => Value::Int(self.u16()? as i64),
            3 => Value::Int(self.u16()? as i16 as i64),
            4 => Value::Int(self.u32()? as i64),
            5 => Value::Int(self.u32()? as i32 as i64),
            6 => Value::Float(f32::from_bits(self.u32()?) as f64),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::Str(self.string()?),
            10 => Value::Int(self.u64()? as i64),
            11 => Value::Int(self.u64()? as i64),
            12 => Value::Float(f64::from_bits(self.u64()?)),
            _ => return Err(GgufError::Corrupt(self.name.clone(), "unknown value type")),
        })
    }

    fn value(&mut self, ty: u32) -> Result<Value, GgufError> {
        if ty != 9 {
            return self.scalar(ty);
        }
        let elem = self.u32()?;
        let n = self.u64()?;
        if n > MAX_ARRAY {
            return Err(GgufError::Corrupt(self.name.clone(), "array too long"));
        }
        match elem {
            8 => {
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.string()?);
                }
                Ok(Value::StrArray(v))
            }
            9 => Err(GgufError::Corrupt(self.name.clone(), "nested arrays")),
            _ => {
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    match self.scalar(elem)? {
                        Value::Int(i) => v.push(i),
                        Value::Bool(b) => v.push(b as i64),
                        _ => {
                            // Float arrays (token scores) are not needed: skip them.
                            continue;
                        }
                    }
                }
                if v.is_empty() && n > 0 {
                    Ok(Value::OtherArray(n))
                } else {
                    Ok(Value::IntArray(v))
                }
            }
        }
    }
}
