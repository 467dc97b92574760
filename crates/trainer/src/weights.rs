//! A model's weights: their SHA-256 fingerprint, and safetensors files that other tools read.

use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::store::{ApplyError, BurnpackStore, ModuleSnapshot, SafetensorsStore};
use burn::tensor::Bytes;
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

/// Every float parameter as f32 values, in the module's fixed field order.
pub fn parameters<M: Module>(model: &M) -> Vec<Vec<f32>> {
    struct Collect(Vec<Vec<f32>>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let data = param.val().into_data().convert::<f32>();
            self.0.push(data.iter::<f32>().collect());
        }
    }
    let mut collect = Collect(Vec::new());
    model.visit(&mut collect);
    collect.0
}

/// Lower-case hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The model's weights as safetensors bytes: the exchange format other tools read.
pub fn to_safetensors<M: ModuleSnapshot>(model: &M) -> Result<Vec<u8>> {
    let mut store = SafetensorsStore::from_bytes(None);
    model
        .save_into(&mut store)
        .map_err(|e| memory_error(e.to_string()))?;
    store.get_bytes().map_err(|e| memory_error(e.to_string()))
}

/// The model's weights as burnpack bytes: burn's own format, which also keeps each
/// parameter's id, and so the link to its optimizer state (checkpoints need that).
pub fn to_burnpack<M: ModuleSnapshot>(model: &M) -> Result<Vec<u8>> {
    let mut store = BurnpackStore::from_bytes(None);
    model
        .save_into(&mut store)
        .map_err(|e| memory_error(e.to_string()))?;
    let bytes = store.get_bytes().map_err(|e| memory_error(e.to_string()))?;
    Ok(bytes.to_vec())
}

fn memory_error(message: String) -> Error {
    Error::Weights {
        path: "<memory>".into(),
        message,
    }
}

/// Writes the weights to `path` as safetensors, atomically (temporary file, fsync, rename).
pub fn save<M: ModuleSnapshot>(model: &M, path: &Path) -> Result<()> {
    write_atomically(path, &to_safetensors(model)?)
}

/// Loads weights into `model`, which must have exactly the stored parameters: burnpack for a
/// `.bpk` file (parameter ids restored too), safetensors otherwise.
pub fn load<M: ModuleSnapshot>(mut model: M, path: &Path) -> Result<M> {
    let weights_error = |message: String| Error::Weights {
        path: path.to_path_buf(),
        message,
    };
    // A regular file only: a FIFO would block the read, a device never end it.
    let bytes = crate::files::read_regular(path, None)
        .map_err(|e| weights_error(format!("cannot read: {e}")))?;
    // Unvalidated and partial: a tensor of the wrong shape, or missing, comes back in the
    // result, named below, instead of as the store's multi-line report.
    let result = if path.extension().is_some_and(|e| e == "bpk") {
        let store = BurnpackStore::from_bytes(Some(Bytes::from_bytes_vec(bytes)));
        model
            .load_from(&mut store.validate(false).allow_partial(true))
            .map_err(|e| e.to_string())
    } else {
        let store = SafetensorsStore::from_bytes(Some(bytes));
        model
            .load_from(&mut store.validate(false).allow_partial(true))
            .map_err(|e| e.to_string())
    }
    .map_err(weights_error)?;
    if !result.is_success() || !result.missing.is_empty() || !result.unused.is_empty() {
        let mut problems: Vec<String> = result.errors.iter().map(describe).collect();
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

/// One problem of a weights file, in a line: `Mlp.output.weight is [512, 10] in the file,
/// [64, 10] in the model`.
fn describe(error: &ApplyError) -> String {
    match error {
        ApplyError::ShapeMismatch {
            path,
            expected,
            found,
        } => format!("{path} is {found} in the file, {expected} in the model"),
        other => other.to_string(),
    }
}
