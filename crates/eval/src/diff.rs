//! How far apart two runs' weights are: the largest absolute elementwise difference between
//! two `model.safetensors` files.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

/// A model's float tensors by name, as f64.
pub type Weights = BTreeMap<String, (Vec<usize>, Vec<f64>)>;

/// Reads every tensor of a safetensors file (f32 or f64) as f64. The error is one line.
pub fn read_weights(path: &Path) -> Result<Weights, String> {
    // A FIFO in a run folder would block a plain read: the trainer's reader refuses it.
    let bytes = allcores_trainer::files::read_regular(path, None)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    weights_from_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses safetensors bytes into tensors (f32 or f64) as f64.
pub fn weights_from_bytes(bytes: &[u8]) -> Result<Weights, String> {
    let tensors = SafeTensors::deserialize(bytes).map_err(|e| format!("not safetensors: {e}"))?;
    let mut weights = Weights::new();
    for (name, view) in tensors.iter() {
        let data = view.data();
        let values: Vec<f64> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
            other => {
                return Err(format!(
                    "tensor {name} is {other:?}: only F32 and F64 compare"
                ));
            }
        };
        weights.insert(name.to_string(), (view.shape().to_vec(), values));
    }
    Ok(weights)
}

/// The largest |a - b| over every weight of two models with the same tensors.
pub fn max_abs_diff(a: &Weights, b: &Weights) -> Result<f64, String> {
    if a.len() != b.len() || a.keys().zip(b.keys()).any(|(x, y)| x != y) {
        return Err("the models have different tensors".into());
    }
    let mut max = 0.0f64;
    for (name, (shape_a, values_a)) in a {
        let (shape_b, values_b) = &b[name];
        if shape_a != shape_b {
            return Err(format!(
                "tensor {name} has shape {shape_a:?} in one model and {shape_b:?} in the other"
            ));
        }
        for (x, y) in values_a.iter().zip(values_b) {
            let d = (x - y).abs();
            // NaN in one model only is the largest difference there is.
            if d.is_nan() && x.is_nan() != y.is_nan() {
                return Ok(f64::INFINITY);
            }
            if d > max {
                max = d;
            }
        }
    }
    Ok(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(values: &[f32]) -> Vec<u8> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view =
            safetensors::tensor::TensorView::new(Dtype::F32, vec![values.len()], &bytes).unwrap();
        safetensors::serialize([("layer.weight", view)], None).unwrap()
    }

    #[test]
    fn the_largest_difference_is_found() {
        let a = weights_from_bytes(&model(&[1.0, 2.0, 3.0])).unwrap();
        let b = weights_from_bytes(&model(&[1.0, 2.5, 2.75])).unwrap();
        assert_eq!(max_abs_diff(&a, &b), Ok(0.5));
        assert_eq!(max_abs_diff(&a, &a), Ok(0.0));
    }

    #[test]
    fn models_of_another_shape_or_not_safetensors_are_refused() {
        let a = weights_from_bytes(&model(&[1.0, 2.0, 3.0])).unwrap();
        let b = weights_from_bytes(&model(&[1.0, 2.0])).unwrap();
        let err = max_abs_diff(&a, &b).unwrap_err();
        assert!(err.contains("layer.weight has shape [3]"), "{err}");
        let err = weights_from_bytes(b"not a model").unwrap_err();
        assert!(err.starts_with("not safetensors"), "{err}");
    }
}
