//! Softmax cross-entropy over logits, forward and backward, in one pass over the rows each.
//!
//! burn's `CrossEntropyLoss` is a dozen tensor operations on a `[batch, classes]` tensor (a
//! max, a shift, an exponential, a sum, a log, a gather, a mean...), each an autodiff node with
//! its own allocation and a backward of its own, on one thread, while the pool's other threads
//! wait. Here the forward pass computes
//! each row's log-sum-exp and keeps the softmax for the backward pass, whose gradient is then
//! one pass: `(softmax - one_hot) * grad / divisor`.
//!
//! Rows are handled one after another and their losses summed in row order, on the calling
//! thread: a few microseconds for the models here, and the same result at any thread count.
//!
//! A row whose target is ignored (`None`: a negative class index, PyTorch's `ignore_index`, such
//! as a language model's padding) adds nothing to the loss and gets a zero gradient; the
//! caller's divisor then counts the other rows only.

/// The loss of a batch and what its backward pass needs.
pub struct CrossEntropy {
    /// The rows' cross-entropies summed (in f64, in row order), over the divisor.
    pub loss: f32,
    /// The softmax of each row, `[rows, classes]`.
    pub softmax: Vec<f32>,
}

/// `sum_i (log_sum_exp(logits_i) - logits_i[targets_i]) / divisor` over the rows whose target
/// is not ignored, for row-major `logits: [targets.len(), classes]`, with each row's softmax (an
/// ignored row's stays zero). With every target ignored the loss is 0, whatever the divisor.
///
/// A NaN or infinite logit in a counted row gives a NaN loss (as burn's loss does), so that a
/// diverged step shows.
///
/// # Panics
/// When a target is not below `classes`, or `logits` is not `targets.len() x classes`.
pub fn forward(
    logits: &[f32],
    targets: &[Option<usize>],
    classes: usize,
    divisor: f32,
) -> CrossEntropy {
    assert_eq!(
        logits.len(),
        targets.len() * classes,
        "cross-entropy: logits for the targets"
    );
    let mut softmax = vec![0.0f32; logits.len()];
    let mut sum = 0.0f64;
    let mut counted = 0usize;
    for ((row, out), &target) in logits
        .chunks_exact(classes)
        .zip(softmax.chunks_exact_mut(classes))
        .zip(targets)
    {
        let Some(target) = target else { continue };
        counted += 1;
        assert!(
            target < classes,
            "cross-entropy: target {target} of {classes} classes"
        );
        // Shifted by the row's maximum so that no exponential overflows. `f32::max` skips NaN,
        // but a NaN logit then makes its exponential and the row's sum NaN.
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut total = 0.0f32;
        for (e, &v) in out.iter_mut().zip(row) {
            *e = (v - max).exp();
            total += *e;
        }
        let log_total = total.ln();
        sum += f64::from(log_total - (row[target] - max));
        let inverse = 1.0 / total;
        out.iter_mut().for_each(|e| *e *= inverse);
    }
    // Nothing counted is no loss, rather than the 0 / 0 of a divisor that counts nothing.
    let loss = if counted == 0 {
        0.0
    } else {
        (sum / f64::from(divisor)) as f32
    };
    CrossEntropy { loss, softmax }
}

/// The gradient of [`forward`]'s loss with respect to the logits, for an upstream gradient
/// `grad`: `(softmax - one_hot(target)) * grad / divisor` (`scale` is `grad / divisor`), written
/// over `softmax`; exactly zero on the rows whose target is ignored.
pub fn backward(
    mut softmax: Vec<f32>,
    targets: &[Option<usize>],
    classes: usize,
    scale: f32,
) -> Vec<f32> {
    for (row, &target) in softmax.chunks_exact_mut(classes).zip(targets) {
        match target {
            Some(target) => {
                row[target] -= 1.0;
                row.iter_mut().for_each(|g| *g *= scale);
            }
            // Zero even for a scale that is infinite or NaN (a divisor of 0).
            None => row.fill(0.0),
        }
    }
    softmax
}

#[cfg(test)]
mod tests {
    use burn::nn::loss::CrossEntropyLossConfig;
    use burn::prelude::*;
    use burn::tensor::{DType, Distribution};

    use super::super::{counted_targets, cross_entropy, cross_entropy_with_burn_ops};
    use super::*;

    /// The loss in f64 straight from its definition: `-ln(softmax(row)[target])`, summed over the
    /// rows that count.
    fn reference(logits: &[f32], targets: &[Option<usize>], classes: usize) -> f64 {
        let rows = logits.chunks_exact(classes).zip(targets);
        rows.filter_map(|(row, &t)| {
            let total: f64 = row.iter().map(|&v| f64::from(v).exp()).sum();
            Some(total.ln() - f64::from(row[t?]))
        })
        .sum()
    }

    #[test]
    fn loss_and_gradient_match_their_definition() {
        let classes = 10;
        let logits: Vec<f32> = super::super::test_values(7 * classes, 3)
            .iter()
            .map(|v| v * 8.0)
            .collect();
        let every = [0, 9, 3, 3, 5, 1, 7].map(Some);
        let some_ignored = [Some(0), None, Some(3), Some(3), None, Some(1), Some(7)];
        for targets in [every, some_ignored] {
            let out = forward(&logits, &targets, classes, 4.0);
            let want = reference(&logits, &targets, classes) / 4.0;
            assert!(
                (f64::from(out.loss) - want).abs() < 1e-6 * want,
                "{} vs {want}",
                out.loss
            );

            // Each gradient against a central difference of the f64 reference.
            let grad = backward(out.softmax, &targets, classes, 0.5 / 4.0);
            for i in 0..logits.len() {
                let h = 1e-3f32;
                let (mut up, mut down) = (logits.clone(), logits.clone());
                up[i] += h;
                down[i] -= h;
                let slope = (reference(&up, &targets, classes)
                    - reference(&down, &targets, classes))
                    / (2.0 * f64::from(h));
                let want = slope * 0.5 / 4.0;
                assert!(
                    (f64::from(grad[i]) - want).abs() < 1e-4,
                    "grad[{i}]: {} vs {want}",
                    grad[i]
                );
            }
        }
    }

    #[test]
    fn large_logits_do_not_overflow_and_bad_ones_show() {
        let out = forward(&[1000.0, 0.0, -1000.0], &[Some(0)], 3, 1.0);
        assert_eq!(out.loss, 0.0);
        assert_eq!(out.softmax, [1.0, 0.0, 0.0]);
        let out = forward(&[1000.0, 0.0, -1000.0], &[Some(1)], 3, 1.0);
        assert_eq!(out.loss, 1000.0);
        for bad in [f32::NAN, f32::INFINITY] {
            let out = forward(&[0.5, bad, 1.0], &[Some(0)], 3, 1.0);
            assert!(out.loss.is_nan(), "{bad}: loss {}", out.loss);
        }
    }

    /// An ignored row adds nothing, not even a NaN of its own, and its gradient is exactly 0;
    /// with every row ignored the loss is 0, for any divisor.
    #[test]
    fn ignored_rows_add_nothing_and_get_zero_gradients() {
        let logits = [0.5, f32::NAN, 1.0, 2.0, -1.0, 0.0];
        let out = forward(&logits, &[None, Some(0)], 3, 2.0);
        let want = reference(&logits[3..], &[Some(0)], 3) / 2.0;
        assert!((f64::from(out.loss) - want).abs() < 1e-6, "{}", out.loss);
        let grad = backward(out.softmax, &[None, Some(0)], 3, 0.5);
        assert_eq!(grad[..3], [0.0; 3]);
        assert!(grad[3..].iter().all(|g| g.is_finite() && *g != 0.0));
        for divisor in [0.0, 5.0] {
            let out = forward(&logits, &[None, None], 3, divisor);
            assert_eq!(out.loss.to_bits(), 0.0f32.to_bits(), "divisor {divisor}");
            let grad = backward(out.softmax, &[None, None], 3, 1.0 / divisor);
            assert!(grad.iter().all(|g| g.to_bits() == 0), "divisor {divisor}");
        }
    }

    #[test]
    #[should_panic(expected = "target 3 of 3 classes")]
    fn a_target_past_the_classes_is_refused() {
        forward(&[0.0; 6], &[Some(0), Some(3)], 3, 1.0);
    }

    #[allow(deprecated)]
    fn devices() -> [Device; 2] {
        [Device::ndarray().autodiff(), Device::flex().autodiff()]
    }

    fn assert_close(got: Tensor<2>, want: Tensor<2>, what: &str) {
        let got = got.into_data().try_to_vec::<f32>().unwrap();
        let want = want.into_data().try_to_vec::<f32>().unwrap();
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-5 * scale, "{what}[{i}]: {g} vs {w}");
        }
    }

    fn assert_close_scalar(got: &Tensor<1>, want: &Tensor<1>, what: &str) {
        let (got, want) = (
            got.clone().into_scalar::<f32>(),
            want.clone().into_scalar::<f32>(),
        );
        assert!(
            (got - want).abs() <= 1e-5 * want.abs(),
            "{what}: {got} vs {want}"
        );
    }

    /// Every third row ignored (-1, and PyTorch's default ignore index -100 once).
    fn masked_targets(rows: usize, classes: usize) -> Vec<i64> {
        let class = |i: usize| ((i * 7) % classes) as i64;
        let ignored = |i: usize| if i == 4 { -100 } else { -1 };
        (0..rows)
            .map(|i| if i % 3 == 1 { ignored(i) } else { class(i) })
            .collect()
    }

    /// Value and logit gradient against burn's `CrossEntropyLoss` on the counted rows alone, the
    /// ignored rows' gradient exactly 0; with and without autodiff, and through the burn-ops
    /// fallback.
    #[test]
    fn masked_cross_entropy_matches_burn_on_the_counted_rows() {
        let (rows, classes) = (37, 65);
        let labels = masked_targets(rows, classes);
        let counted: Vec<i64> = (0..rows as i64)
            .filter(|&i| labels[i as usize] >= 0)
            .collect();
        assert_eq!(counted_targets(&labels), counted.len());
        for device in devices() {
            device.seed(23);
            let logits =
                Tensor::<2>::random([rows, classes], Distribution::Normal(0.0, 4.0), &device)
                    .require_grad();
            let targets = Tensor::<1, Int>::from_ints(labels.as_slice(), &device);
            let kept = Tensor::<1, Int>::from_ints(counted.as_slice(), &device);
            let divisor = 100.0;
            let reference = CrossEntropyLossConfig::new()
                .init(&device)
                .forward(
                    logits.clone().select(0, kept.clone()),
                    targets.clone().select(0, kept),
                )
                .mul_scalar(counted.len() as f32 / divisor);
            let ref_grad = logits.grad(&reference.clone().backward()).unwrap();
            let ours = cross_entropy(logits.clone(), targets.clone(), divisor);
            let fallback = cross_entropy_with_burn_ops(logits.clone(), targets.clone(), divisor);
            let inference = cross_entropy(logits.clone().inner(), targets.clone().inner(), divisor);
            for (loss, what) in [(&ours, "kernel"), (&fallback, "burn ops")] {
                assert_close_scalar(loss, &reference, what);
                let grad = logits.grad(&loss.clone().backward()).unwrap();
                assert_close(grad.clone(), ref_grad.clone(), what);
                let grad = grad.into_data().try_to_vec::<f32>().unwrap();
                for row in (0..rows).filter(|&i| labels[i] < 0) {
                    let ignored = &grad[row * classes..][..classes];
                    assert!(ignored.iter().all(|g| g.to_bits() == 0), "{what} row {row}");
                }
            }
            assert_close_scalar(&inference, &reference.inner(), "no autodiff");
        }
    }

    #[test]
    fn a_fully_ignored_batch_has_zero_loss_and_gradient() {
        for device in devices() {
            let logits = Tensor::<2>::random([5, 7], Distribution::Default, &device).require_grad();
            let targets = Tensor::<1, Int>::from_ints([-1, -1, -100, -1, -1], &device);
            for divisor in [0.0, 12.0] {
                let loss = cross_entropy(logits.clone(), targets.clone(), divisor);
                assert_eq!(loss.clone().into_scalar::<f32>().to_bits(), 0);
                let grad = logits.grad(&loss.backward()).unwrap();
                let grad = grad.into_data().try_to_vec::<f32>().unwrap();
                assert!(grad.iter().all(|g| g.to_bits() == 0), "divisor {divisor}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "target 65 of 65 classes")]
    fn a_nonnegative_target_past_the_classes_still_panics() {
        let device = devices()[0].clone();
        let logits = Tensor::<2>::zeros([3, 65], &device).require_grad();
        let targets = Tensor::<1, Int>::from_ints([0, -1, 65], &device);
        cross_entropy(logits, targets, 2.0);
    }

    /// Half-precision logits go through burn's operations; ignored rows are ignored there too.
    #[test]
    fn half_precision_logits_ignore_rows_too() {
        let device = Device::flex().autodiff();
        device.seed(29);
        let (rows, classes) = (12, 65);
        let labels = masked_targets(rows, classes);
        let logits = Tensor::<2>::random([rows, classes], Distribution::Default, &device)
            .cast(DType::BF16)
            .detach()
            .require_grad();
        let targets = Tensor::<1, Int>::from_ints(labels.as_slice(), &device);
        let wide = logits.clone().detach().cast(DType::F32);
        let want = cross_entropy(wide, targets.clone(), 8.0).into_scalar::<f32>();
        let loss = cross_entropy(logits.clone(), targets, 8.0);
        let got = loss.clone().cast(DType::F32).into_scalar::<f32>();
        assert!((got - want).abs() <= 2e-2 * want, "{got} vs {want}");
        let grad = logits.grad(&loss.backward()).unwrap();
        let grad = grad
            .cast(DType::F32)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        for row in (0..rows).filter(|&i| labels[i] < 0) {
            assert!(grad[row * classes..][..classes].iter().all(|&g| g == 0.0));
        }
    }

    /// The loss is summed on the calling thread: bit for bit the same in pools of 1 and 3.
    #[test]
    fn masked_loss_does_not_depend_on_the_thread_count() {
        let (rows, classes) = (768, 65);
        let labels = masked_targets(rows, classes);
        let values = super::super::test_values(rows * classes, 31);
        let run = |device: &Device| {
            let logits =
                Tensor::<2>::from_data(TensorData::new(values.clone(), [rows, classes]), device)
                    .require_grad();
            let targets = Tensor::<1, Int>::from_ints(labels.as_slice(), device);
            let divisor = counted_targets(&labels) as f32;
            let loss = cross_entropy(logits.clone(), targets, divisor);
            let grad = logits.grad(&loss.clone().backward()).unwrap();
            let grad = grad.into_data().try_to_vec::<f32>().unwrap();
            let mut bits = vec![loss.into_scalar::<f32>().to_bits()];
            bits.extend(grad.into_iter().map(f32::to_bits));
            bits
        };
        for device in devices() {
            let in_pool = |threads| crate::test_data::in_pool(threads, || run(&device));
            assert!(in_pool(1) == in_pool(3), "{device:?}");
        }
    }
}
