//! 2x2 max-pool with stride 2 on plain f32 slices, NCHW.
//!
//! The output is `floor(h / 2) x floor(w / 2)`, like burn's `MaxPool2d` and PyTorch: an odd last
//! row or column is dropped. Every input element belongs to at most one window, so the backward
//! pass writes each input gradient once and its result does not depend on the order of the work.
//!
//! Ties: the gradient goes to the **first** maximum of the window in row-major order (top-left,
//! top-right, bottom-left, bottom-right), as in PyTorch. A NaN counts as larger than any number,
//! and the first NaN wins.

use rayon::prelude::*;

/// Planes per rayon task: enough work per task to amortise scheduling.
const PLANES_PER_TASK: usize = 16;

/// Index (0..4) of the first maximum of a window `[top-left, top-right, bottom-left,
/// bottom-right]`.
#[inline]
fn argmax4(window: [f32; 4]) -> usize {
    let mut best = 0;
    for (i, &v) in window.iter().enumerate().skip(1) {
        let b = window[best];
        if v > b || (v.is_nan() && !b.is_nan()) {
            best = i;
        }
    }
    best
}

#[inline]
fn window(plane: &[f32], width: usize, i: usize, j: usize) -> [f32; 4] {
    let top = 2 * i * width + 2 * j;
    let bottom = top + width;
    [plane[top], plane[top + 1], plane[bottom], plane[bottom + 1]]
}

/// `x` is `planes` planes of `height x width`; returns `planes` planes of `height/2 x width/2`.
pub fn forward(x: &[f32], planes: usize, height: usize, width: usize) -> Vec<f32> {
    assert_eq!(x.len(), planes * height * width, "max_pool2x2: input size");
    let (oh, ow) = (height / 2, width / 2);
    let mut y = vec![0.0f32; planes * oh * ow];
    if y.is_empty() {
        return y;
    }
    y.par_chunks_mut(oh * ow)
        .zip(x.par_chunks(height * width))
        .with_min_len(PLANES_PER_TASK)
        .for_each(|(y, x)| {
            for i in 0..oh {
                for j in 0..ow {
                    let w = window(x, width, i, j);
                    y[i * ow + j] = w[argmax4(w)];
                }
            }
        });
    y
}

/// The input gradient of [`forward`]: `dy` goes to the maximum of each window (found again in
/// `x`, the forward input), zero elsewhere.
pub fn backward(x: &[f32], dy: &[f32], planes: usize, height: usize, width: usize) -> Vec<f32> {
    assert_eq!(x.len(), planes * height * width, "max_pool2x2 backward: input size");
    let (oh, ow) = (height / 2, width / 2);
    assert_eq!(dy.len(), planes * oh * ow, "max_pool2x2 backward: gradient size");
    let mut dx = vec![0.0f32; x.len()];
    if oh * ow == 0 {
        return dx;
    }
    dx.par_chunks_mut(height * width)
        .zip(x.par_chunks(height * width))
        .zip(dy.par_chunks(oh * ow))
        .with_min_len(PLANES_PER_TASK)
        .for_each(|((dx, x), dy)| {
            for i in 0..oh {
                for j in 0..ow {
                    let a = argmax4(window(x, width, i, j));
                    let at = (2 * i + a / 2) * width + 2 * j + a % 2;
                    dx[at] = dy[i * ow + j];
                }
            }
        });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_sizes_drop_the_last_row_and_column() {
        // One 3x5 plane -> 1x2.
        let x = [
            1.0, 5.0, 2.0, 0.0, 9.0, //
            3.0, 4.0, 8.0, 1.0, 9.0, //
            9.0, 9.0, 9.0, 9.0, 9.0,
        ];
        assert_eq!(forward(&x, 1, 3, 5), vec![5.0, 8.0]);
        let dx = backward(&x, &[10.0, 20.0], 1, 3, 5);
        let mut want = vec![0.0; 15];
        want[1] = 10.0;
        want[7] = 20.0;
        assert_eq!(dx, want);
    }

    #[test]
    fn ties_send_the_gradient_to_the_first_maximum() {
        // Window 1: all equal -> top-left. Window 2: bottom-left and bottom-right tie -> bottom-left.
        let x = [
            2.0, 2.0, 0.0, 1.0, //
            2.0, 2.0, 7.0, 7.0,
        ];
        assert_eq!(forward(&x, 1, 2, 4), vec![2.0, 7.0]);
        let dx = backward(&x, &[1.0, 1.0], 1, 2, 4);
        assert_eq!(dx, vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn nan_wins_the_window() {
        assert_eq!(argmax4([1.0, f32::NAN, 3.0, f32::NAN]), 1);
        assert!(forward(&[1.0, f32::NAN, 3.0, 2.0], 1, 2, 2)[0].is_nan());
    }
}
