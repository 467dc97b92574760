//! The exact (erf) GELU on plain slices, forward and backward: `gelu(x) = x · Φ(x)` with
//! `Φ(x) = (1 + erf(x / √2)) / 2`, PyTorch's default `F.gelu` (not the tanh approximation), and
//! its derivative `Φ(x) + x · φ(x)`, `φ` the normal density.
//!
//! `Φ` is computed from `erfc(|x| / √2)` as `t · exp(P(t) - z²)`, `t = 1 / (1 + z / 2)`, with
//! the Chebyshev fit of Numerical Recipes (`erfcc`, relative error below 1.2e-7 everywhere), and
//! the exponential by range reduction and a polynomial (Cephes' `expf`): no branch and no call,
//! so that the loops vectorise. The `libm` crate's `erff` (the tests' reference, through its f64
//! `erfc`) is a scalar function with branches and `expf` calls in its tails, dozens of times
//! slower: the GELU of the GPT's MLP would cost more than its matrix products. In the negative
//! tail the error stays small relative to `Φ` itself, not only to 1 (where `1 + erf` in f32, as
//! burn's GELU computes it, has no correct digit left).
//!
//! Every element is computed on its own (no sum): rayon runs fixed chunks of [`ELEMENTS_PER_TASK`] elements,
//! and the result does not depend on the thread count. Nor on the CPU's vector width: the
//! polynomials use fused multiply-adds (`mul_add`, rounded once, so the same bits with the
//! instruction or without it; AVX2 CPUs have it, older x86 ones take a slow software path).

use std::f32::consts::FRAC_1_SQRT_2;

use rayon::prelude::*;

use super::ELEMENTS_PER_TASK;
use super::values::{Buffer, Values, build_as};

/// `1 / √(2π)`: the normal density at 0.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `gelu(x)` for every element of `x`, in the format of `x`.
pub fn forward(x: Values<'_>) -> Buffer {
    build_as(x.format(), x.len(), ELEMENTS_PER_TASK, |i, y| {
        let mut scratch = Vec::new();
        let x = x.read(
            i * ELEMENTS_PER_TASK..i * ELEMENTS_PER_TASK + y.len(),
            &mut scratch,
        );
        gelu_slice(x, y);
    })
}

/// The gradient of [`forward`] given the gradient `dy` of its output: `dy · gelu'(x)`, in the
/// format of `dy`.
///
/// # Panics
/// When `x` and `dy` differ in length.
pub fn backward(x: Values<'_>, dy: Values<'_>) -> Buffer {
    assert_eq!(x.len(), dy.len(), "gelu backward: gradient size");
    build_as(dy.format(), dy.len(), ELEMENTS_PER_TASK, |i, g| {
        let range = i * ELEMENTS_PER_TASK..i * ELEMENTS_PER_TASK + g.len();
        dy.widen_into(range.start, g);
        let mut scratch = Vec::new();
        let x = x.read(range, &mut scratch);
        scale_by_derivative_slice(x, g);
    })
}

/// [`backward`] written over an f32 `dy` that the caller owns: no new buffer.
///
/// # Panics
/// When `x` and `dy` differ in length.
pub fn backward_in_place(x: Values<'_>, dy: &mut [f32]) {
    assert_eq!(x.len(), dy.len(), "gelu backward: gradient size");
    dy.par_chunks_mut(ELEMENTS_PER_TASK)
        .enumerate()
        .for_each(|(i, g)| {
            let mut scratch = Vec::new();
            let x = x.read(
                i * ELEMENTS_PER_TASK..i * ELEMENTS_PER_TASK + g.len(),
                &mut scratch,
            );
            scale_by_derivative_slice(x, g);
        });
}

/// Defines `fn $name(arguments) -> output` that calls the `#[inline(always)]` function `$kernel`
/// with them inside a variant compiled for the widest vectors the CPU has (AVX-512F, AVX2 with
/// FMA, or the build's baseline), so that its loops vectorise that wide. (A closure handed to a
/// generic dispatcher stays a function of its own, compiled for the baseline: it is not
/// inlined.) Element-wise code gives the same bits in every variant; sums fix their own order.
macro_rules! widest_vectors {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $out:ty)? = $kernel:path;) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) $(-> $out)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $out)? {
                    $kernel($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $out)? {
                    $kernel($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F, and with it AVX2 and FMA.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $kernel($($arg),*)
        }
    };
}
pub(super) use widest_vectors;

widest_vectors! {
    /// `y[i] = gelu(x[i])`.
    fn gelu_slice(x: &[f32], y: &mut [f32]) = gelu_into;
}

widest_vectors! {
    /// `g[i] *= gelu'(x[i])`.
    fn scale_by_derivative_slice(x: &[f32], g: &mut [f32]) = scale_by_derivative;
}

#[inline(always)]
fn gelu_into(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = gelu(x);
    }
}

#[inline(always)]
fn scale_by_derivative(x: &[f32], g: &mut [f32]) {
    for (g, &x) in g.iter_mut().zip(x) {
        *g *= derivative(x);
    }
}

/// `gelu(x)`, one value.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    x * normal_cdf(x)
}

/// `gelu'(x) = Φ(x) + x · φ(x)`.
#[inline(always)]
pub fn derivative(x: f32) -> f32 {
    let density = FRAC_1_SQRT_2PI * exp(-0.5 * x * x);
    x.mul_add(density, normal_cdf(x))
}

/// `Φ(x) = erfc(-x / √2) / 2`: from `erfc(|x| / √2)`, which keeps its relative accuracy in the
/// negative tail (where `Φ` is small) rather than subtracting from 1 there.
#[inline(always)]
fn normal_cdf(x: f32) -> f32 {
    let half_erfc = 0.5 * erfc_non_negative(x.abs() * FRAC_1_SQRT_2);
    if x < 0.0 { half_erfc } else { 1.0 - half_erfc }
}

/// `erfc(z)` for `z >= 0` (NaN stays NaN): Numerical Recipes' `erfcc`, relative error below
/// 1.2e-7 (before f32 rounding).
#[inline(always)]
fn erfc_non_negative(z: f32) -> f32 {
    const P: [f32; 10] = [
        -1.265_512_2,
        1.000_023_7,
        0.374_091_96,
        0.096_784_18,
        -0.186_288_06,
        0.278_868_07,
        -1.135_204,
        1.488_515_9,
        -0.822_152_23,
        0.170_872_77,
    ];
    let t = 1.0 / 0.5f32.mul_add(z, 1.0);
    t * exp(degree_9(t, &P) - z * z)
}

/// `c[0] + c[1] t + ... + c[9] t⁹` by Estrin's scheme with fused multiply-adds: pairs of terms
/// `c[2i] + c[2i + 1] t`, joined by `t²`, `t⁴` and `t⁸`. A chain of 4 dependent steps rather
/// than Horner's 9: the loops are bound by that latency more than by the arithmetic.
#[inline(always)]
fn degree_9(t: f32, c: &[f32; 10]) -> f32 {
    let (t2, pair) = (t * t, |i: usize| c[i + 1].mul_add(t, c[i]));
    let t4 = t2 * t2;
    let low = pair(2).mul_add(t2, pair(0));
    let middle = pair(6).mul_add(t2, pair(4));
    let high = pair(8);
    high.mul_add(t4 * t4, middle.mul_add(t4, low))
}

/// `c[0] + c[1] r + ... + c[5] r⁵`, as [`degree_9`].
#[inline(always)]
fn degree_5(r: f32, c: &[f32; 6]) -> f32 {
    let (r2, pair) = (r * r, |i: usize| c[i + 1].mul_add(r, c[i]));
    pair(4).mul_add(r2 * r2, pair(2).mul_add(r2, pair(0)))
}

/// Below this, [`exp`] gives 0: `e^v` would be subnormal.
const EXP_MIN: f32 = -87.0;

/// `e^v` for `v <= 1` (0 below [`EXP_MIN`]; NaN stays NaN), Cephes' `expf`: `v = n ln 2 + r`
/// with `|r| <= ln 2 / 2` (`ln 2` in two parts, so that `n ln 2` is exact enough), a degree-7
/// polynomial for `e^r`, and `2^n` built in the exponent bits. Within about 1 ulp.
#[inline(always)]
fn exp(v: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding and subtracting it rounds a float below 2^22 to an integer (to nearest).
    const ROUND: f32 = 12_582_912.0;
    /// `(e^r - 1 - r) / r²`, Cephes' coefficients.
    const E: [f32; 6] = [
        0.5,
        0.166_666_65,
        4.166_579_6e-2,
        8.333_452e-3,
        1.398_199_9e-3,
        1.987_569_1e-4,
    ];
    let clamped = if v < EXP_MIN { EXP_MIN } else { v };
    // `1.5 · 2^23 + n`, `n` the nearest integer: in the low bits of the mantissa.
    let shifted = clamped.mul_add(std::f32::consts::LOG2_E, ROUND);
    let n = shifted - ROUND;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, clamped));
    let p = (degree_5(r, &E) * r).mul_add(r, r) + 1.0;
    // `2^n` from the integer bits of `shifted` (no float-to-int conversion: Rust's saturating
    // one does not vectorise). `n` lies in [-126, 1], so `n + 127` is a normal float's biased
    // exponent; a NaN's garbage scale leaves `p` NaN.
    let biased = shifted
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127);
    let scale = f32::from_bits(biased << 23);
    if v < EXP_MIN { 0.0 } else { p * scale }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::values::Format;

    /// GELU in f64 from `libm`'s `erfc` (`1 + erf` would cancel in the negative tail).
    fn exact(x: f64) -> f64 {
        0.5 * x * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2)
    }

    /// Its derivative in f64, `Φ(x) + x · φ(x)`, and the size of its two terms, `Φ(x) + |x φ(x)|`.
    fn exact_derivative(x: f64) -> (f64, f64) {
        let cdf = 0.5 * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2);
        let term = x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        (cdf + term, cdf + term.abs())
    }

    /// Every 1/1024 from -16 to 16, plus tiny values: GELU and its derivative against the f64
    /// values, relative to the value itself (for the derivative, to its two terms' size: they
    /// cancel where it crosses 0, near -0.75), the tails included. The bound grows with `x²`:
    /// `-x² / 2` in f32 carries an error relative to its size into the exponential. Values
    /// below 1e-30 (where ours stops at subnormals) count as 1e-30.
    #[test]
    fn gelu_and_its_derivative_match_libm() {
        let points = (-16 * 1024..=16 * 1024).map(|i| i as f64 / 1024.0);
        for x in points.chain([1e-30, -1e-30, 1e-7, -1e-7, 0.0, -0.0]) {
            let bound = 5e-7 * (1.0 + x * x / 2.0);
            let (slope, slope_terms) = exact_derivative(x);
            let cases = [
                ("gelu", gelu(x as f32), exact(x), exact(x).abs()),
                ("derivative", derivative(x as f32), slope, slope_terms),
            ];
            for (what, got, want, size) in cases {
                let error = (got as f64 - want).abs() / size.max(1e-30);
                assert!(
                    error <= bound,
                    "{what}({x}): {got} vs {want} (relative {error:e}, bound {bound:e})"
                );
            }
        }
    }

    #[test]
    fn special_values() {
        assert_eq!(gelu(0.0), 0.0);
        assert_eq!(gelu(f32::INFINITY), f32::INFINITY);
        assert_eq!(gelu(-100.0), 0.0);
        assert_eq!(gelu(100.0), 100.0);
        assert!(gelu(f32::NAN).is_nan());
        assert!(derivative(f32::NAN).is_nan());
        assert_eq!(derivative(100.0), 1.0);
        assert_eq!(derivative(-100.0), 0.0);
        assert!((derivative(0.0) - 0.5).abs() < 1e-7);
        assert!((exp(0.0) - 1.0).abs() < 1e-7);
        assert!((exp(-1.0) as f64 - (-1.0f64).exp()).abs() < 1e-7);
        assert_eq!(exp(-90.0), 0.0);
    }

    /// The slice kernels give the scalar functions' bits, whatever the pool and the format's
    /// path (in place or not); half formats round the f32 result once.
    #[test]
    fn kernels_give_the_scalar_bits_at_any_thread_count() {
        let n = 3 * ELEMENTS_PER_TASK + 77;
        let x: Vec<f32> = crate::kernels::test_values(n, 1)
            .iter()
            .map(|v| v * 6.0)
            .collect();
        let dy = crate::kernels::test_values(n, 2);
        let want_y: Vec<u32> = x.iter().map(|&x| gelu(x).to_bits()).collect();
        let want_dx: Vec<u32> = x
            .iter()
            .zip(&dy)
            .map(|(&x, &g)| (g * derivative(x)).to_bits())
            .collect();
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                assert_eq!(bits(forward(Values::from(&x)).into_f32()), want_y);
                let dx = backward(Values::from(&x), Values::from(&dy));
                assert_eq!(bits(dx.into_f32()), want_dx);
                let mut in_place = dy.clone();
                backward_in_place(Values::from(&x), &mut in_place);
                assert_eq!(bits(in_place), want_dx);
            });
        }
        let half = Buffer::from_f32(x.clone(), Format::Bf16);
        let wide = half.clone().into_f32();
        let y = forward(half.values());
        let want = Buffer::from_f32(forward(Values::from(&wide)).into_f32(), Format::Bf16);
        assert_eq!(y, want);
    }
}
