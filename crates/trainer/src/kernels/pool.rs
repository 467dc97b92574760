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

/// Whether `v` takes the place of `best` as a window's maximum: strictly larger, or the first
/// NaN. Written without short-circuits so that it compiles to selects, not branches (random data
/// would mispredict every other one).
#[inline(always)]
fn beats(v: f32, best: f32) -> bool {
    (v > best) | (v.is_nan() & !best.is_nan())
}

/// Index (0..4) and value of the first maximum of a window `[top-left, top-right, bottom-left,
/// bottom-right]`: a tournament in which a tie keeps the earlier element.
#[inline(always)]
fn argmax4([a, b, c, d]: [f32; 4]) -> (usize, f32) {
    let (i01, m01) = if beats(b, a) { (1, b) } else { (0, a) };
    let (i23, m23) = if beats(d, c) { (3, d) } else { (2, c) };
    if beats(m23, m01) {
        (i23, m23)
    } else {
        (i01, m01)
    }
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
            for (i, y) in y.chunks_exact_mut(ow).enumerate() {
                let top = &x[2 * i * width..][..2 * ow];
                let bottom = &x[(2 * i + 1) * width..][..2 * ow];
                // Plain indexing over exact lengths: the loop vectorises (stride-2 loads).
                for j in 0..ow {
                    y[j] =
                        argmax4([top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1]]).1;
                }
            }
        });
    y
}

/// The input gradient of [`forward`]: `dy` goes to the maximum of each window (found again in
/// `x`, the forward input), zero elsewhere.
pub fn backward(x: &[f32], dy: &[f32], planes: usize, height: usize, width: usize) -> Vec<f32> {
    assert_eq!(
        x.len(),
        planes * height * width,
        "max_pool2x2 backward: input size"
    );
    let (oh, ow) = (height / 2, width / 2);
    assert_eq!(
        dy.len(),
        planes * oh * ow,
        "max_pool2x2 backward: gradient size"
    );
    let mut dx = vec![0.0f32; x.len()];
    if oh * ow == 0 {
        return dx;
    }
    dx.par_chunks_mut(height * width)
        .zip(x.par_chunks(height * width))
        .zip(dy.par_chunks(oh * ow))
        .with_min_len(PLANES_PER_TASK)
        .for_each(|((dx, x), dy)| {
            for (i, dy) in dy.chunks_exact(ow).enumerate() {
                let top = &x[2 * i * width..][..2 * ow];
                let bottom = &x[(2 * i + 1) * width..][..2 * ow];
                let (dtop, dbottom) = dx[2 * i * width..].split_at_mut(width);
                let (dtop, dbottom) = (&mut dtop[..2 * ow], &mut dbottom[..2 * ow]);
                for j in 0..ow {
                    let window = [top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1]];
                    let (at, _) = argmax4(window);
                    let g = dy[j];
                    dtop[2 * j] = if at == 0 { g } else { 0.0 };
                    dtop[2 * j + 1] = if at == 1 { g } else { 0.0 };
                    dbottom[2 * j] = if at == 2 { g } else { 0.0 };
                    dbottom[2 * j + 1] = if at == 3 { g } else { 0.0 };
                }
            }
        });
    dx
}

/// Pools one `height x width` plane into `y` (`height/2 x width/2`) and writes the index (0..4)
/// of each window's maximum into `argmax`; with `relu`, the outputs are clamped at zero (the max
/// of a ReLU is the ReLU of the max).
pub(crate) fn plane_forward(
    x: &[f32],
    height: usize,
    width: usize,
    y: &mut [f32],
    argmax: &mut [u8],
    relu: bool,
) {
    let (oh, ow) = (height / 2, width / 2);
    for i in 0..oh {
        let top = &x[2 * i * width..][..2 * ow];
        let bottom = &x[(2 * i + 1) * width..][..2 * ow];
        let (y, argmax) = (&mut y[i * ow..][..ow], &mut argmax[i * ow..][..ow]);
        for j in 0..ow {
            let (at, max) = argmax4([top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1]]);
            y[j] = if relu && max < 0.0 { 0.0 } else { max };
            argmax[j] = at as u8;
        }
    }
}

/// The adjoint of [`plane_forward`]: writes the whole `height x width` plane `dx`, with `dy` at
/// each window's maximum and zero elsewhere. With `relu_output` (the pooled, ReLU-clamped output
/// `y`), a window whose output is not positive passes nothing.
pub(crate) fn plane_backward(
    dy: &[f32],
    argmax: &[u8],
    relu_output: Option<&[f32]>,
    height: usize,
    width: usize,
    dx: &mut [f32],
) {
    let (oh, ow) = (height / 2, width / 2);
    if height % 2 == 1 || width % 2 == 1 {
        dx.fill(0.0);
    }
    for i in 0..oh {
        let (dtop, dbottom) = dx[2 * i * width..].split_at_mut(width);
        let (dtop, dbottom) = (&mut dtop[..2 * ow], &mut dbottom[..2 * ow]);
        let (dy, argmax) = (&dy[i * ow..][..ow], &argmax[i * ow..][..ow]);
        match relu_output {
            Some(y) => {
                let y = &y[i * ow..][..ow];
                for j in 0..ow {
                    let (at, g) = (argmax[j], if y[j] > 0.0 { dy[j] } else { 0.0 });
                    dtop[2 * j] = if at == 0 { g } else { 0.0 };
                    dtop[2 * j + 1] = if at == 1 { g } else { 0.0 };
                    dbottom[2 * j] = if at == 2 { g } else { 0.0 };
                    dbottom[2 * j + 1] = if at == 3 { g } else { 0.0 };
                }
            }
            None => {
                for j in 0..ow {
                    let (at, g) = (argmax[j], dy[j]);
                    dtop[2 * j] = if at == 0 { g } else { 0.0 };
                    dtop[2 * j + 1] = if at == 1 { g } else { 0.0 };
                    dbottom[2 * j] = if at == 2 { g } else { 0.0 };
                    dbottom[2 * j + 1] = if at == 3 { g } else { 0.0 };
                }
            }
        }
    }
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
        assert_eq!(argmax4([1.0, f32::NAN, 3.0, f32::NAN]).0, 1);
        assert_eq!(argmax4([1.0, 3.0, f32::NAN, 2.0]).0, 2);
        assert_eq!(argmax4([3.0, 3.0, 1.0, 3.0]).0, 0);
        assert_eq!(argmax4([1.0, 2.0, 3.0, 3.0]).0, 2);
        assert!(forward(&[1.0, f32::NAN, 3.0, 2.0], 1, 2, 2)[0].is_nan());
    }
}
