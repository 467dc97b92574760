//! 2x2 max-pool with stride 2 on plain f32 slices, NCHW.
//!
//! The output is `floor(h / 2) x floor(w / 2)`, like burn's `MaxPool2d` and PyTorch: an odd last
//! row or column is dropped. Every input element belongs to at most one window, so the backward
//! pass writes each input gradient once and its result does not depend on the order of the work.
//!
//! Ties: the gradient goes to the **first** maximum of the window in row-major order (top-left,
//! top-right, bottom-left, bottom-right), as in PyTorch. A NaN counts as larger than any number,
//! and the first NaN wins.

use super::values::{Buffer, Values, build_as};

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

/// `x` is `planes` planes of `height x width`; returns `planes` planes of `height/2 x width/2`,
/// in the format of `x`.
pub fn forward<'a>(x: impl Into<Values<'a>>, planes: usize, height: usize, width: usize) -> Buffer {
    let x = x.into();
    assert_eq!(x.len(), planes * height * width, "max_pool2x2: input size");
    let (oh, ow) = (height / 2, width / 2);
    if planes * oh * ow == 0 {
        return Buffer::from_f32(Vec::new(), x.format());
    }
    let task = PLANES_PER_TASK * oh * ow;
    build_as(x.format(), planes * oh * ow, task, |chunk, y| {
        let mut scratch = Vec::new();
        for (k, y) in y.chunks_exact_mut(oh * ow).enumerate() {
            let plane = chunk * PLANES_PER_TASK + k;
            let x = x.read(
                plane * height * width..(plane + 1) * height * width,
                &mut scratch,
            );
            for (i, y) in y.chunks_exact_mut(ow).enumerate() {
                let top = &x[2 * i * width..][..2 * ow];
                let bottom = &x[(2 * i + 1) * width..][..2 * ow];
                // Plain indexing over exact lengths: the loop vectorises (stride-2 loads).
                for j in 0..ow {
                    y[j] =
                        argmax4([top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1]]).1;
                }
            }
        }
    })
}

/// The input gradient of [`forward`]: `dy` goes to the maximum of each window (found again in
/// `x`, the forward input), zero elsewhere. In the format of `x`.
pub fn backward<'a>(
    x: impl Into<Values<'a>>,
    dy: impl Into<Values<'a>>,
    planes: usize,
    height: usize,
    width: usize,
) -> Buffer {
    let (x, dy) = (x.into(), dy.into());
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
    if oh * ow == 0 {
        return Buffer::from_f32(vec![0.0; x.len()], x.format());
    }
    let task = PLANES_PER_TASK * height * width;
    build_as(x.format(), x.len(), task, |chunk, dx| {
        let (mut x_scratch, mut dy_scratch) = (Vec::new(), Vec::new());
        for (k, dx) in dx.chunks_exact_mut(height * width).enumerate() {
            let plane = chunk * PLANES_PER_TASK + k;
            let x = x.read(
                plane * height * width..(plane + 1) * height * width,
                &mut x_scratch,
            );
            let dy = dy.read(plane * oh * ow..(plane + 1) * oh * ow, &mut dy_scratch);
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
        }
    })
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
        #[cfg(target_arch = "x86_64")]
        let done = sse::row_forward(top, bottom, y, argmax, relu);
        #[cfg(not(target_arch = "x86_64"))]
        let done = 0;
        for j in done..ow {
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
        let y = relu_output.map(|y| &y[i * ow..][..ow]);
        #[cfg(target_arch = "x86_64")]
        let done = sse::row_backward(dy, argmax, y, dtop, dbottom);
        #[cfg(not(target_arch = "x86_64"))]
        let done = 0;
        for j in done..ow {
            let at = argmax[j];
            // Without a positive ReLU output (NaN included), no gradient.
            let g = if y.is_none_or(|y| y[j] > 0.0) {
                dy[j]
            } else {
                0.0
            };
            dtop[2 * j] = if at == 0 { g } else { 0.0 };
            dtop[2 * j + 1] = if at == 1 { g } else { 0.0 };
            dbottom[2 * j] = if at == 2 { g } else { 0.0 };
            dbottom[2 * j + 1] = if at == 3 { g } else { 0.0 };
        }
    }
}

/// Four windows at a time with SSE2, which every x86-64 CPU has; the same comparisons, in the
/// same order, as [`argmax4`], so the results are those of the scalar code.
#[cfg(target_arch = "x86_64")]
mod sse {
    use std::arch::x86_64::*;

    /// [`super::beats`], lane by lane: all ones where `v` takes the place of `best`.
    #[inline(always)]
    fn beats(v: __m128, best: __m128) -> __m128 {
        // SAFETY (every intrinsic of this module): SSE and SSE2 are part of x86-64.
        // !(v <= best) is `v > best` or either is NaN; a NaN `best` is never replaced.
        unsafe { _mm_andnot_ps(_mm_cmpunord_ps(best, best), _mm_cmpnle_ps(v, best)) }
    }

    /// `mask ? a : b`, lane by lane.
    #[inline(always)]
    fn select(mask: __m128, a: __m128, b: __m128) -> __m128 {
        // SAFETY: SSE.
        unsafe { _mm_or_ps(_mm_and_ps(mask, a), _mm_andnot_ps(mask, b)) }
    }

    /// Loads 8 consecutive values and splits them into even and odd positions.
    #[inline(always)]
    fn deinterleave(row: &[f32]) -> (__m128, __m128) {
        assert!(row.len() >= 8);
        // SAFETY: SSE; `row` holds at least 8 values, read by unaligned loads.
        unsafe {
            let lo = _mm_loadu_ps(row.as_ptr());
            let hi = _mm_loadu_ps(row.as_ptr().add(4));
            (
                _mm_shuffle_ps::<0b10_00_10_00>(lo, hi),
                _mm_shuffle_ps::<0b11_01_11_01>(lo, hi),
            )
        }
    }

    /// Stores `even` and `odd` interleaved into 8 consecutive values.
    #[inline(always)]
    fn interleave(even: __m128, odd: __m128, row: &mut [f32]) {
        assert!(row.len() >= 8);
        // SAFETY: SSE; `row` holds at least 8 values, written by unaligned stores.
        unsafe {
            _mm_storeu_ps(row.as_mut_ptr(), _mm_unpacklo_ps(even, odd));
            _mm_storeu_ps(row.as_mut_ptr().add(4), _mm_unpackhi_ps(even, odd));
        }
    }

    /// The forward pass over the first multiple of 4 windows of a row; returns how many.
    pub(super) fn row_forward(
        top: &[f32],
        bottom: &[f32],
        y: &mut [f32],
        argmax: &mut [u8],
        relu: bool,
    ) -> usize {
        let done = y.len() / 4 * 4;
        for j in (0..done).step_by(4) {
            let (a, b) = deinterleave(&top[2 * j..]);
            let (c, d) = deinterleave(&bottom[2 * j..]);
            // The tournament of `argmax4`: a tie keeps the earlier element.
            let m01 = beats(b, a);
            let m23 = beats(d, c);
            let (max01, max23) = (select(m01, b, a), select(m23, d, c));
            let m = beats(max23, max01);
            let max = select(m, max23, max01);
            // SAFETY: SSE2; `j + 4 <= done <= y.len()`, an unaligned store.
            let at = unsafe {
                let negative = _mm_cmplt_ps(max, _mm_setzero_ps());
                let max = if relu {
                    _mm_andnot_ps(negative, max)
                } else {
                    max
                };
                _mm_storeu_ps(y[j..j + 4].as_mut_ptr(), max);
                // Index = m ? 2 + m23 : m01, with the masks (0 or -1) turned into 0 or 1.
                let zero = _mm_setzero_si128();
                let bit01 = _mm_sub_epi32(zero, _mm_castps_si128(m01));
                let bit23 = _mm_sub_epi32(zero, _mm_castps_si128(m23));
                let bottom = _mm_add_epi32(bit23, _mm_set1_epi32(2));
                let m = _mm_castps_si128(m);
                let at = _mm_or_si128(_mm_and_si128(m, bottom), _mm_andnot_si128(m, bit01));
                // Four 32-bit lanes of 0..4 -> four bytes, lane 0 first.
                let at = _mm_packus_epi16(_mm_packs_epi32(at, zero), zero);
                _mm_cvtsi128_si32(at).to_le_bytes()
            };
            argmax[j..j + 4].copy_from_slice(&at);
        }
        done
    }

    /// The backward pass over the first multiple of 4 windows of a row; returns how many.
    pub(super) fn row_backward(
        dy: &[f32],
        argmax: &[u8],
        relu_output: Option<&[f32]>,
        dtop: &mut [f32],
        dbottom: &mut [f32],
    ) -> usize {
        let done = dy.len() / 4 * 4;
        for j in (0..done).step_by(4) {
            let at: [u8; 4] = argmax[j..j + 4].try_into().expect("4 indices");
            // SAFETY: SSE2; unaligned loads of 4 values at `j + 4 <= done <= dy.len()`, and
            // `relu_output` has the length of `dy`.
            let [g0, g1, g2, g3] = unsafe {
                let mut g = _mm_loadu_ps(dy[j..j + 4].as_ptr());
                if let Some(y) = relu_output {
                    let y = _mm_loadu_ps(y[j..j + 4].as_ptr());
                    g = _mm_and_ps(_mm_cmpgt_ps(y, _mm_setzero_ps()), g);
                }
                let at = _mm_set_epi32(at[3].into(), at[2].into(), at[1].into(), at[0].into());
                [0, 1, 2, 3].map(|k| {
                    let hit = _mm_castsi128_ps(_mm_cmpeq_epi32(at, _mm_set1_epi32(k)));
                    _mm_and_ps(hit, g)
                })
            };
            interleave(g0, g1, &mut dtop[2 * j..]);
            interleave(g2, g3, &mut dbottom[2 * j..]);
        }
        done
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
        assert_eq!(forward(&x, 1, 3, 5).into_f32(), vec![5.0, 8.0]);
        let dx = backward(&x, &[10.0, 20.0], 1, 3, 5).into_f32();
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
        assert_eq!(forward(&x, 1, 2, 4).into_f32(), vec![2.0, 7.0]);
        let dx = backward(&x, &[1.0, 1.0], 1, 2, 4).into_f32();
        assert_eq!(dx, vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
    }

    /// The SSE path and the scalar tail agree window for window (widths of 4k and 4k + r).
    #[test]
    fn every_window_follows_the_scalar_rule() {
        let values = [
            0.5,
            -1.0,
            0.5,
            2.0,
            f32::NAN,
            -0.0,
            0.0,
            3.0,
            2.0,
            2.0,
            -4.0,
            1.5,
        ];
        for width in [2, 8, 10, 16, 22] {
            let height = 6;
            let x: Vec<f32> = (0..height * width)
                .map(|i| values[(i * 7 + i / 5) % values.len()])
                .collect();
            let (oh, ow) = (height / 2, width / 2);
            for relu in [false, true] {
                let (mut y, mut argmax) = (vec![0.0; oh * ow], vec![0u8; oh * ow]);
                plane_forward(&x, height, width, &mut y, &mut argmax, relu);
                for i in 0..oh {
                    for j in 0..ow {
                        let top = 2 * i * width + 2 * j;
                        let window = [x[top], x[top + 1], x[top + width], x[top + width + 1]];
                        let (at, max) = argmax4(window);
                        let max = if relu && max < 0.0 { 0.0 } else { max };
                        assert_eq!(argmax[i * ow + j] as usize, at, "{window:?}");
                        assert_eq!(y[i * ow + j].to_bits(), max.to_bits(), "{window:?}");
                    }
                }
                let dy: Vec<f32> = (0..oh * ow).map(|k| k as f32 + 1.0).collect();
                let mut dx = vec![f32::NAN; height * width];
                plane_backward(&dy, &argmax, relu.then_some(&y[..]), height, width, &mut dx);
                for i in 0..oh {
                    for j in 0..ow {
                        let pass = !relu || y[i * ow + j] > 0.0;
                        for k in 0..4 {
                            let at = (2 * i + k / 2) * width + 2 * j + k % 2;
                            let want = if pass && argmax[i * ow + j] as usize == k {
                                dy[i * ow + j]
                            } else {
                                0.0
                            };
                            assert_eq!(dx[at], want);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn nan_wins_the_window() {
        assert_eq!(argmax4([1.0, f32::NAN, 3.0, f32::NAN]).0, 1);
        assert_eq!(argmax4([1.0, 3.0, f32::NAN, 2.0]).0, 2);
        assert_eq!(argmax4([3.0, 3.0, 1.0, 3.0]).0, 0);
        assert_eq!(argmax4([1.0, 2.0, 3.0, 3.0]).0, 2);
        assert!(forward(&[1.0, f32::NAN, 3.0, 2.0], 1, 2, 2).into_f32()[0].is_nan());
    }
}
