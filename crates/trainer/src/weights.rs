//! A model's weights: their SHA-256 fingerprint, and safetensors files that other tools read.

use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::store::{ModuleSnapshot, SafetensorsStore};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::files::write_atomically;

/// SHA-256 of every float parameter, in the module's fixed field order: each parameter's shape
/// (u64 little-endian per dimension), then its values as f32 little-endian bytes. Equal hashes
/// mean bitwise equal models.
pub fn weights_sha256<M: Module>(model: &M) -> String {
    struct Hasher(Sha256);
    impl ModuleVisitor for Hasher {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let tensor = param.val();
            for dim in tensor.dims() {
                self.0.update((dim as u64).to_le_bytes());
            }
            let data = tensor.into_data().convert::<f32>();
            for value in data.iter::<f32>() {
                self.0.update(value.to_le_bytes());
            }
        }
    }
    let mut hasher = Hasher(Sha256::new());
    model.visit(&mut hasher);
    hex(&hasher.0.finalize())
}

/// Lower-case hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The model's weights as safetensors bytes.
pub fn to_safetensors<M: ModuleSnapshot>(model: &M) -> Result<Vec<u8>> {
    let mut store = SafetensorsStore::from_bytes(None);
    let weights_error = |message: String| Error::Weights {
        path: "<memory>".into(),
        message,
    };
    model
        .save_into(&mut store)
        .map_err(|e| weights_error(e.to_string()))?;
    store.get_bytes().map_err(|e| weights_error(e.to_string()))
}

/// Writes the weights to `path` atomically (temporary file, fsync, rename).
pub fn save<M: ModuleSnapshot>(model: &M, path: &Path) -> Result<()> {
    write_atomically(path, &to_safetensors(model)?)
}

/// Loads weights from `path` into `model`, which must have exactly the stored parameters.
pub fn load<M: ModuleSnapshot>(mut model: M, path: &Path) -> Result<M> {
    let weights_error = |message: String| Error::Weights {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| weights_error(format!("cannot read: {e}")))?;
    let mut store = SafetensorsStore::from_bytes(Some(bytes));
    let result = model
        .load_from(&mut store)
        .map_err(|e| weights_error(e.to_string()))?;
    if !result.is_success() || !result.missing.is_empty() || !result.unused.is_empty() {
        let mut problems: Vec<String> = result.errors.iter().map(|e| e.to_string()).collect();
        problems.extend(
            result
                .missing
                .iter()
                .map(|(name, _)| format!("{name} missing")),
        );
        problems.extend(
            result
                .unused
                .iter()
                .map(|name| format!("{name} not in the model")),
        );
        return Err(weights_error(format!(
            "does not fit the model: {}",
            problems.join(", ")
        )));
    }
    Ok(model)
}
