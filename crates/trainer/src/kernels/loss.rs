//! Softmax cross-entropy over logits, forward and backward, in one pass over the rows each.
//!
//! burn's `CrossEntropyLoss` is a dozen tensor operations on a `[batch, classes]` tensor (a
//! max, a shift, an exponential, a sum, a log, a gather, a mean...), each an autodiff node with
//! its own allocation and a backward of its own: 50 to 60 us a step for the MLP's 128 x 10
//! logits, on one thread, while the pool's other threads wait. Here the forward pass computes
//! each row's log-sum-exp and keeps the softmax for the backward pass, whose gradient is then
//! one pass: `(softmax - one_hot) * grad / divisor`.
//!
//! Rows are handled one after another and their losses summed in row order, on the calling
//! thread: a few microseconds for the models here, and the same result at any thread count.

/// The loss of a batch and what its backward pass needs.
pub struct CrossEntropy {
    /// The rows' cross-entropies summed (in f64, in row order), over the divisor.
    pub loss: f32,
    /// The softmax of each row, `[rows, classes]`.
    pub softmax: Vec<f32>,
}

/// `sum_i (log_sum_exp(logits_i) - logits_i[targets_i]) / divisor` for row-major
/// `logits: [targets.len(), classes]`, with each row's softmax.
///
/// A NaN or infinite logit gives a NaN loss (as burn's loss does), so that a diverged step shows.
///
/// # Panics
/// When a target is not below `classes`, or `logits` is not `targets.len() x classes`.
pub fn forward(logits: &[f32], targets: &[usize], classes: usize, divisor: f32) -> CrossEntropy {
    assert_eq!(
        logits.len(),
        targets.len() * classes,
        "cross-entropy: logits for the targets"
    );
    let mut softmax = vec![0.0f32; logits.len()];
    let mut sum = 0.0f64;
    for ((row, out), &target) in logits
        .chunks_exact(classes)
        .zip(softmax.chunks_exact_mut(classes))
        .zip(targets)
    {
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
    CrossEntropy {
        loss: (sum / f64::from(divisor)) as f32,
        softmax,
    }
}

/// The gradient of [`forward`]'s loss with respect to the logits, for an upstream gradient
/// `grad`: `(softmax - one_hot(target)) * grad / divisor`, written over `softmax`.
pub fn backward(mut softmax: Vec<f32>, targets: &[usize], classes: usize, scale: f32) -> Vec<f32> {
    for (row, &target) in softmax.chunks_exact_mut(classes).zip(targets) {
        row[target] -= 1.0;
        row.iter_mut().for_each(|g| *g *= scale);
    }
    softmax
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loss in f64 straight from its definition: `-ln(softmax(row)[target])`.
    fn reference(logits: &[f32], targets: &[usize], classes: usize) -> f64 {
        let rows = logits.chunks_exact(classes).zip(targets);
        rows.map(|(row, &t)| {
            let total: f64 = row.iter().map(|&v| f64::from(v).exp()).sum();
            total.ln() - f64::from(row[t])
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
        let targets = [0, 9, 3, 3, 5, 1, 7];
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
            let slope = (reference(&up, &targets, classes) - reference(&down, &targets, classes))
                / (2.0 * f64::from(h));
            let want = slope * 0.5 / 4.0;
            assert!(
                (f64::from(grad[i]) - want).abs() < 1e-4,
                "grad[{i}]: {} vs {want}",
                grad[i]
            );
        }
    }

    #[test]
    fn large_logits_do_not_overflow_and_bad_ones_show() {
        let out = forward(&[1000.0, 0.0, -1000.0], &[0], 3, 1.0);
        assert_eq!(out.loss, 0.0);
        assert_eq!(out.softmax, [1.0, 0.0, 0.0]);
        let out = forward(&[1000.0, 0.0, -1000.0], &[1], 3, 1.0);
        assert_eq!(out.loss, 1000.0);
        for bad in [f32::NAN, f32::INFINITY] {
            let out = forward(&[0.5, bad, 1.0], &[0], 3, 1.0);
            assert!(out.loss.is_nan(), "{bad}: loss {}", out.loss);
        }
    }

    #[test]
    #[should_panic(expected = "target 3 of 3 classes")]
    fn a_target_past_the_classes_is_refused() {
        forward(&[0.0; 6], &[0, 3], 3, 1.0);
    }
}
