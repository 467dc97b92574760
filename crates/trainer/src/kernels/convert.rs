//! f32 ↔ f16/bf16 slice conversions with the CPU's vector instructions, into uninitialised
//! memory.
//!
//! The `half` crate's slice conversions call a non-inlined function per 8 values and write into
//! initialised slices only (so buffers get zeroed first): in an f16 training step on burn-flex
//! they took a large share of the time. Here f16 uses AVX-512F's 16-lane conversion (or F16C's 8-lane one)
//! chosen at run time, and bf16, which is the top half of an f32, plain loops that vectorise.
//! Rounding is to nearest, ties to even, as in `half` (the same bits: a test checks).
//!
//! Emulated half precision needs the rounding without the format: [`RoundsInF32`] rounds an f32
//! to a half format's value and keeps it in f32, with integer and float arithmetic on the f32
//! itself (the same bits as narrowing and widening with `half`, checked for every f32), so that
//! a loop that reads a value for other work can round it on the way.

use std::mem::MaybeUninit;

use half::{bf16, f16};

/// A float format whose every value f32 holds: f32 itself, f16, bf16.
pub trait RoundsInF32 {
    /// The largest finite value.
    const MAX: f32;
    /// The magnitude from which an f32 rounds to infinity: halfway from the largest value to
    /// the next power of two (the tie goes to infinity, whose bits are even).
    const OVERFLOW: f32;

    /// `x` rounded to this format (to nearest, ties to even) and kept in f32: for a half
    /// format, the value that narrowing then widening gives (a NaN stays a NaN), computed on the
    /// f32 itself, with selects and no branches so that loops of it vectorise.
    fn round_in_f32(x: f32) -> f32;
}

impl RoundsInF32 for f32 {
    const MAX: f32 = f32::MAX;
    const OVERFLOW: f32 = f32::INFINITY;

    #[inline(always)]
    fn round_in_f32(x: f32) -> f32 {
        x
    }
}

/// A 16-bit float format the conversions serve.
pub trait HalfFloat: RoundsInF32 + Copy + Send + Sync {
    /// `dst[i] = src[i]` as f32 (exact).
    fn widen(src: &[Self], dst: &mut [MaybeUninit<f32>]);
    /// `dst[i] = src[i]` rounded to this format (to nearest, ties to even).
    fn narrow(src: &[f32], dst: &mut [MaybeUninit<Self>]);
}

/// `dst[i] = src[i]` rounded to `T`'s values, in f32 ([`RoundsInF32::round_in_f32`]).
///
/// Emulated half precision rounds this way rather than by narrowing and widening: one pass,
/// no half buffer, and the same rounding inlines into loops that read values once for other
/// work (the fused optimizers' updates, the loss scaler's overflow check).
pub fn round_in_f32<T: RoundsInF32>(src: &[f32], dst: &mut [MaybeUninit<f32>]) {
    assert_eq!(src.len(), dst.len(), "rounding: lengths");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above.
            return unsafe { x86::round_avx512::<T>(src, dst) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { x86::round_avx2::<T>(src, dst) };
        }
    }
    round_loop::<T>(src, dst)
}

/// [`round_in_f32`] where the values lie.
pub fn round_in_f32_in_place<T: RoundsInF32>(values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above.
            return unsafe { x86::round_in_place_avx512::<T>(values) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { x86::round_in_place_avx2::<T>(values) };
        }
    }
    round_in_place_loop::<T>(values)
}

/// `values` as possibly uninitialised memory, for a writer that stores only initialised values.
///
/// # Safety
/// Nothing may write an uninitialised value through the result.
pub unsafe fn as_uninit<T>(values: &mut [T]) -> &mut [MaybeUninit<T>] {
    // SAFETY: `MaybeUninit<T>` has the layout of `T`; the caller keeps the values initialised.
    unsafe { &mut *(values as *mut [T] as *mut [MaybeUninit<T>]) }
}

impl HalfFloat for f16 {
    fn widen(src: &[f16], dst: &mut [MaybeUninit<f32>]) {
        f16_to_f32(src, dst)
    }
    fn narrow(src: &[f32], dst: &mut [MaybeUninit<f16>]) {
        f32_to_f16(src, dst)
    }
}

impl RoundsInF32 for f16 {
    const MAX: f32 = 65504.0;
    const OVERFLOW: f32 = 65520.0;

    #[inline(always)]
    fn round_in_f32(x: f32) -> f32 {
        /// f16's smallest normal value, 2^-14: below it, its values are multiples of 2^-24.
        const MIN_NORMAL: f32 = 6.103_515_6e-5;
        let a = x.abs();
        let bits = a.to_bits();
        // The 13 fraction bits f16 lacks, rounded to nearest, ties to even (adding 0xfff plus
        // the lowest kept bit); a carry into the exponent is the right result.
        let normal = f32::from_bits(bits.wrapping_add(0x0fff + ((bits >> 13) & 1)) & !0x1fff);
        // f32's spacing in [0.5, 1) is 2^-24: adding 0.5 rounds to it (to nearest, ties to
        // even), and taking 0.5 away again is exact.
        let subnormal = (a + 0.5) - 0.5;
        // Past the overflow point: infinity, or the NaN itself.
        let rounded = if a < MIN_NORMAL {
            subnormal
        } else if a < Self::OVERFLOW {
            normal
        } else {
            a + f32::INFINITY
        };
        rounded.copysign(x)
    }
}

impl HalfFloat for bf16 {
    fn widen(src: &[bf16], dst: &mut [MaybeUninit<f32>]) {
        bf16_to_f32(src, dst)
    }
    fn narrow(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
        f32_to_bf16(src, dst)
    }
}

impl RoundsInF32 for bf16 {
    /// bf16's largest value, bits 0x7f7f, and the point halfway to 2^128.
    const MAX: f32 = f32::from_bits(0x7f7f_0000);
    const OVERFLOW: f32 = f32::from_bits(0x7f7f_8000);

    #[inline(always)]
    fn round_in_f32(x: f32) -> f32 {
        // The 16 low bits rounded away as `f32_to_bf16_loop` rounds them; overflow carries
        // into infinity.
        let bits = x.to_bits();
        let rounded = f32::from_bits(bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000);
        if x.is_nan() { x } else { rounded }
    }
}

/// `dst[i] = src[i]` as f32 (exact).
pub fn f16_to_f32(src: &[f16], dst: &mut [MaybeUninit<f32>]) {
    assert_eq!(src.len(), dst.len(), "conversion: lengths");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above; the lengths are equal.
            let done = unsafe { x86::f16_to_f32_avx512(src, dst) };
            return scalar_f16_to_f32(&src[done..], &mut dst[done..]);
        }
        if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx")
        {
            // SAFETY: the CPU has F16C and AVX, checked just above; the lengths are equal.
            let done = unsafe { x86::f16_to_f32_f16c(src, dst) };
            return scalar_f16_to_f32(&src[done..], &mut dst[done..]);
        }
    }
    scalar_f16_to_f32(src, dst)
}

/// `dst[i] = src[i]` rounded to f16 (to nearest, ties to even; overflow to infinity).
pub fn f32_to_f16(src: &[f32], dst: &mut [MaybeUninit<f16>]) {
    assert_eq!(src.len(), dst.len(), "conversion: lengths");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above; the lengths are equal.
            let done = unsafe { x86::f32_to_f16_avx512(src, dst) };
            return scalar_f32_to_f16(&src[done..], &mut dst[done..]);
        }
        if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx")
        {
            // SAFETY: the CPU has F16C and AVX, checked just above; the lengths are equal.
            let done = unsafe { x86::f32_to_f16_f16c(src, dst) };
            return scalar_f32_to_f16(&src[done..], &mut dst[done..]);
        }
    }
    scalar_f32_to_f16(src, dst)
}

/// `dst[i] = src[i]` as f32 (exact: a bf16 is the top 16 bits of an f32).
pub fn bf16_to_f32(src: &[bf16], dst: &mut [MaybeUninit<f32>]) {
    assert_eq!(src.len(), dst.len(), "conversion: lengths");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above.
            return unsafe { x86::bf16_to_f32_avx512(src, dst) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { x86::bf16_to_f32_avx2(src, dst) };
        }
    }
    bf16_to_f32_loop(src, dst)
}

/// `dst[i] = src[i]` rounded to bf16 (to nearest, ties to even; a NaN stays a quiet NaN).
pub fn f32_to_bf16(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
    assert_eq!(src.len(), dst.len(), "conversion: lengths");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above.
            return unsafe { x86::f32_to_bf16_avx512(src, dst) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { x86::f32_to_bf16_avx2(src, dst) };
        }
    }
    f32_to_bf16_loop(src, dst)
}

// The bf16 conversions are plain loops, compiled once per instruction set below (the default
// target has only SSE2's 4 lanes and no 32-to-16-bit narrowing: the loops ran 2x slower).

#[inline(always)]
fn bf16_to_f32_loop(src: &[bf16], dst: &mut [MaybeUninit<f32>]) {
    for (d, s) in dst.iter_mut().zip(src) {
        d.write(f32::from_bits((s.to_bits() as u32) << 16));
    }
}

#[inline(always)]
fn f32_to_bf16_loop(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        let bits = s.to_bits();
        // Adding 0x7fff plus the lowest kept bit rounds the 16 dropped bits to nearest, ties to
        // even; a NaN keeps its top bits and is made quiet, as `half` does. Selects, not
        // branches, so that the loop vectorises.
        let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
        let nan = ((bits >> 16) | 0x0040) as u16;
        d.write(bf16::from_bits(if s.is_nan() { nan } else { rounded }));
    }
}

#[inline(always)]
fn round_loop<T: RoundsInF32>(src: &[f32], dst: &mut [MaybeUninit<f32>]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(T::round_in_f32(s));
    }
}

#[inline(always)]
fn round_in_place_loop<T: RoundsInF32>(values: &mut [f32]) {
    for v in values {
        *v = T::round_in_f32(*v);
    }
}

fn scalar_f16_to_f32(src: &[f16], dst: &mut [MaybeUninit<f32>]) {
    for (d, s) in dst.iter_mut().zip(src) {
        d.write(s.to_f32());
    }
}

fn scalar_f32_to_f16(src: &[f32], dst: &mut [MaybeUninit<f16>]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(f16::from_f32(s));
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use half::{bf16, f16};

    /// [`super::bf16_to_f32_loop`] in 16 lanes.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn bf16_to_f32_avx512(src: &[bf16], dst: &mut [MaybeUninit<f32>]) {
        super::bf16_to_f32_loop(src, dst)
    }

    /// [`super::f32_to_bf16_loop`] in 16 lanes.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn f32_to_bf16_avx512(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
        super::f32_to_bf16_loop(src, dst)
    }

    /// [`super::bf16_to_f32_loop`] in 8 lanes.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn bf16_to_f32_avx2(src: &[bf16], dst: &mut [MaybeUninit<f32>]) {
        super::bf16_to_f32_loop(src, dst)
    }

    /// [`super::f32_to_bf16_loop`] in 8 lanes.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn f32_to_bf16_avx2(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
        super::f32_to_bf16_loop(src, dst)
    }

    /// [`super::round_loop`] in 16 lanes.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn round_avx512<T: super::RoundsInF32>(src: &[f32], dst: &mut [MaybeUninit<f32>]) {
        super::round_loop::<T>(src, dst)
    }

    /// [`super::round_loop`] in 8 lanes.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn round_avx2<T: super::RoundsInF32>(src: &[f32], dst: &mut [MaybeUninit<f32>]) {
        super::round_loop::<T>(src, dst)
    }

    /// [`super::round_in_place_loop`] in 16 lanes.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn round_in_place_avx512<T: super::RoundsInF32>(values: &mut [f32]) {
        super::round_in_place_loop::<T>(values)
    }

    /// [`super::round_in_place_loop`] in 8 lanes.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn round_in_place_avx2<T: super::RoundsInF32>(values: &mut [f32]) {
        super::round_in_place_loop::<T>(values)
    }

    /// Round to nearest, ties to even (AVX-512: and raise no floating-point exception).
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT;
    const NEAREST_NO_EXC: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

    /// Converts the whole 16-lane blocks of `src`; returns how many values it converted.
    ///
    /// # Safety
    /// The CPU must have AVX-512F, and `dst` must be as long as `src`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn f16_to_f32_avx512(src: &[f16], dst: &mut [MaybeUninit<f32>]) -> usize {
        let blocks = src.len() / 16;
        for b in 0..blocks {
            // SAFETY: block `b` lies inside both slices (16 values each); unaligned loads and
            // stores; `f16` is a `u16`.
            unsafe {
                let half = _mm256_loadu_si256(src.as_ptr().add(16 * b).cast());
                _mm512_storeu_ps(dst.as_mut_ptr().add(16 * b).cast(), _mm512_cvtph_ps(half));
            }
        }
        blocks * 16
    }

    /// Converts the whole 16-lane blocks of `src`; returns how many values it converted.
    ///
    /// # Safety
    /// The CPU must have AVX-512F, and `dst` must be as long as `src`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn f32_to_f16_avx512(src: &[f32], dst: &mut [MaybeUninit<f16>]) -> usize {
        let blocks = src.len() / 16;
        for b in 0..blocks {
            // SAFETY: as above.
            unsafe {
                let wide = _mm512_loadu_ps(src.as_ptr().add(16 * b));
                let half = _mm512_cvtps_ph::<NEAREST_NO_EXC>(wide);
                _mm256_storeu_si256(dst.as_mut_ptr().add(16 * b).cast(), half);
            }
        }
        blocks * 16
    }

    /// Converts the whole 8-lane blocks of `src`; returns how many values it converted.
    ///
    /// # Safety
    /// The CPU must have F16C and AVX, and `dst` must be as long as `src`.
    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn f16_to_f32_f16c(src: &[f16], dst: &mut [MaybeUninit<f32>]) -> usize {
        let blocks = src.len() / 8;
        for b in 0..blocks {
            // SAFETY: as above, 8 values a block.
            unsafe {
                let half = _mm_loadu_si128(src.as_ptr().add(8 * b).cast());
                _mm256_storeu_ps(dst.as_mut_ptr().add(8 * b).cast(), _mm256_cvtph_ps(half));
            }
        }
        blocks * 8
    }

    /// Converts the whole 8-lane blocks of `src`; returns how many values it converted.
    ///
    /// # Safety
    /// The CPU must have F16C and AVX, and `dst` must be as long as `src`.
    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn f32_to_f16_f16c(src: &[f32], dst: &mut [MaybeUninit<f16>]) -> usize {
        let blocks = src.len() / 8;
        for b in 0..blocks {
            // SAFETY: as above, 8 values a block.
            unsafe {
                let wide = _mm256_loadu_ps(src.as_ptr().add(8 * b));
                let half = _mm256_cvtps_ph::<NEAREST>(wide);
                _mm_storeu_si128(dst.as_mut_ptr().add(8 * b).cast(), half);
            }
        }
        blocks * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Times each conversion over 1M values (in L3, as a step's): `cargo test --release -p
    /// allcores-trainer time_conversions -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn time_conversions() {
        use std::hint::black_box;
        use std::time::Instant;
        fn time(what: &str, mut f: impl FnMut()) {
            f();
            let reps = 200;
            let start = Instant::now();
            for _ in 0..reps {
                f();
            }
            let ns = start.elapsed().as_secs_f64() * 1e9 / (reps * N) as f64;
            eprintln!("{what}: {ns:.3} ns a value");
        }
        const N: usize = 1 << 20;
        let wide: Vec<f32> = (0..N).map(|i| (i as f32 * 0.37).sin() * 100.0).collect();
        let mut out = vec![MaybeUninit::<f32>::uninit(); N];
        let (mut f16s, mut bf16s) = (vec![f16::ZERO; N], vec![bf16::ZERO; N]);
        time("f32 -> f16", || {
            f32_to_f16(black_box(&wide), as_uninit_ref(&mut f16s))
        });
        time("f16 -> f32", || f16_to_f32(black_box(&f16s), &mut out));
        time("f32 -> bf16", || {
            f32_to_bf16(black_box(&wide), as_uninit_ref(&mut bf16s))
        });
        time("bf16 -> f32", || bf16_to_f32(black_box(&bf16s), &mut out));
        time("f32 rounded to f16, in f32", || {
            round_in_f32::<f16>(black_box(&wide), &mut out)
        });
        time("f32 rounded to bf16, in f32", || {
            round_in_f32::<bf16>(black_box(&wide), &mut out)
        });
        time("f32 -> bf16, default target", || {
            f32_to_bf16_loop(black_box(&wide), as_uninit_ref(&mut bf16s))
        });
        time("bf16 -> f32, default target", || {
            bf16_to_f32_loop(black_box(&bf16s), &mut out)
        });
    }

    /// A conversion of a slice into another's uninitialised elements.
    type Conversion<'a, A, B> = &'a dyn Fn(&[A], &mut [MaybeUninit<B>]);

    /// Every compiled bf16 conversion (default target, AVX2, AVX-512) gives the same bits.
    fn bf16_variants_agree(halves: &[u16], floats: &[f32]) {
        let bf16s: Vec<bf16> = halves.iter().map(|&b| bf16::from_bits(b)).collect();
        let widen = |f: Conversion<bf16, f32>| {
            let mut out = vec![0.0f32; bf16s.len()];
            f(&bf16s, as_uninit_ref(&mut out));
            out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let narrow = |f: Conversion<f32, bf16>| {
            let mut out = vec![bf16::ZERO; floats.len()];
            f(floats, as_uninit_ref(&mut out));
            out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let (wide, narrowed) = (widen(&bf16_to_f32_loop), narrow(&f32_to_bf16_loop));
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2, checked just above.
                assert_eq!(widen(&|s, d| unsafe { x86::bf16_to_f32_avx2(s, d) }), wide);
                assert_eq!(
                    narrow(&|s, d| unsafe { x86::f32_to_bf16_avx2(s, d) }),
                    narrowed
                );
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F, checked just above.
                assert_eq!(
                    widen(&|s, d| unsafe { x86::bf16_to_f32_avx512(s, d) }),
                    wide
                );
                assert_eq!(
                    narrow(&|s, d| unsafe { x86::f32_to_bf16_avx512(s, d) }),
                    narrowed
                );
            }
        }
    }

    /// `round_in_f32` gives the bits of narrowing with `half` and widening back, for `floats`
    /// (a NaN: a NaN), on every compiled path.
    fn rounds_in_f32_as_half_does(floats: &[f32]) {
        fn check<T: RoundsInF32>(floats: &[f32], reference: impl Fn(f32) -> f32) {
            let mut out = vec![0.0f32; floats.len()];
            round_in_f32::<T>(floats, as_uninit_ref(&mut out));
            let mut in_place = floats.to_vec();
            round_in_f32_in_place::<T>(&mut in_place);
            let mut plain = vec![0.0f32; floats.len()];
            round_loop::<T>(floats, as_uninit_ref(&mut plain));
            let mut plain_in_place = floats.to_vec();
            round_in_place_loop::<T>(&mut plain_in_place);
            // The 8-lane path, which the dispatch passes over on an AVX-512 machine.
            let (mut avx2, mut avx2_in_place) = (plain.clone(), plain_in_place.clone());
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                avx2_in_place = floats.to_vec();
                // SAFETY: the CPU has AVX2, checked just above.
                unsafe {
                    x86::round_avx2::<T>(floats, as_uninit_ref(&mut avx2));
                    x86::round_in_place_avx2::<T>(&mut avx2_in_place);
                }
            }
            for (i, &v) in floats.iter().enumerate() {
                let want = reference(v);
                let paths = [out[i], in_place[i], plain[i], plain_in_place[i]];
                for got in paths.into_iter().chain([avx2[i], avx2_in_place[i]]) {
                    assert!(
                        got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                        "{v:e} ({:#x}): {got:e} != {want:e}",
                        v.to_bits()
                    );
                }
            }
        }
        check::<f16>(floats, |v| f16::from_f32(v).to_f32());
        check::<bf16>(floats, |v| bf16::from_f32(v).to_f32());
    }

    /// `MAX` is the format's largest value, `OVERFLOW` the first f32 that rounds past it.
    #[test]
    fn max_and_overflow_are_the_formats_own() {
        fn check<T: RoundsInF32>(max: f32) {
            assert_eq!(T::MAX, max);
            let below = f32::from_bits(T::OVERFLOW.to_bits() - 1);
            assert_eq!(T::round_in_f32(below), T::MAX);
            assert_eq!(T::round_in_f32(T::OVERFLOW), f32::INFINITY);
        }
        check::<f16>(f16::MAX.to_f32());
        check::<bf16>(bf16::MAX.to_f32());
    }

    /// Every 4099th f32 bit pattern (both signs, every exponent) rounds in f32 as `half` rounds.
    #[test]
    fn rounding_in_f32_equals_the_half_crate_across_the_range() {
        let floats: Vec<f32> = (0..=u32::MAX).step_by(4099).map(f32::from_bits).collect();
        rounds_in_f32_as_half_does(&floats);
    }

    /// Every f32 (4 billion values): `cargo test --release -p allcores-trainer
    /// rounding_in_f32_equals_the_half_crate_for_every_f32 -- --ignored`.
    #[test]
    #[ignore]
    fn rounding_in_f32_equals_the_half_crate_for_every_f32() {
        use rayon::prelude::*;
        (0..=u16::MAX).into_par_iter().for_each(|high| {
            let floats: Vec<f32> = (0..=u16::MAX)
                .map(|low| f32::from_bits((high as u32) << 16 | low as u32))
                .collect();
            rounds_in_f32_as_half_does(&floats);
        });
    }

    fn as_uninit_ref<T>(values: &mut [T]) -> &mut [MaybeUninit<T>] {
        // SAFETY: the conversions write initialised values only.
        unsafe { as_uninit(values) }
    }

    /// Every f16 and every bf16 value widens as `half` widens it, and f32 values around every
    /// rounding boundary (ties included), infinities, NaN, subnormals and overflow round as
    /// `half` rounds them. Odd lengths exercise the scalar tails.
    #[test]
    fn conversions_equal_the_half_crate() {
        let halves: Vec<u16> = (0..=u16::MAX).collect();
        let f16s: Vec<f16> = halves.iter().map(|&b| f16::from_bits(b)).collect();
        let bf16s: Vec<bf16> = halves.iter().map(|&b| bf16::from_bits(b)).collect();
        let mut wide = vec![MaybeUninit::uninit(); halves.len()];
        f16_to_f32(&f16s, &mut wide);
        for (h, w) in f16s.iter().zip(&wide) {
            // SAFETY: written by the conversion.
            let w = unsafe { w.assume_init() };
            assert!(h.to_f32().to_bits() == w.to_bits() || (h.is_nan() && w.is_nan()));
        }
        bf16_to_f32(&bf16s, &mut wide);
        for (h, w) in bf16s.iter().zip(&wide) {
            // SAFETY: written by the conversion.
            let w = unsafe { w.assume_init() };
            // A NaN stays a NaN (`half` also makes a signalling one quiet).
            assert!(h.to_f32().to_bits() == w.to_bits() || (h.is_nan() && w.is_nan()));
        }

        // Each f16/bf16 value, and the f32 values just around and halfway to its neighbour.
        let mut floats: Vec<f32> = Vec::new();
        for &b in &halves {
            for v in [f16::from_bits(b).to_f32(), bf16::from_bits(b).to_f32()] {
                let bits = v.to_bits();
                floats.extend([v, f32::from_bits(bits.wrapping_add(1))]);
                floats.extend([f32::from_bits(bits.wrapping_sub(1))]);
                floats.extend([f32::from_bits(bits | 0x1000), f32::from_bits(bits | 0x8000)]);
            }
        }
        floats.extend([
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e30,
            -1e-30,
            65520.0,
        ]);
        floats.push(0.1); // an odd length
        bf16_variants_agree(&halves, &floats);
        rounds_in_f32_as_half_does(&floats);
        let mut f16_out = vec![MaybeUninit::uninit(); floats.len()];
        f32_to_f16(&floats, &mut f16_out);
        let mut bf16_out = vec![MaybeUninit::uninit(); floats.len()];
        f32_to_bf16(&floats, &mut bf16_out);
        for ((&v, h), b) in floats.iter().zip(&f16_out).zip(&bf16_out) {
            // SAFETY: written by the conversions.
            let (h, b) = unsafe { (h.assume_init(), b.assume_init()) };
            if v.is_nan() {
                assert!(h.is_nan() && b.is_nan());
            } else {
                assert_eq!(h.to_bits(), f16::from_f32(v).to_bits(), "f16 of {v:e}");
                assert_eq!(b.to_bits(), bf16::from_f32(v).to_bits(), "bf16 of {v:e}");
            }
        }
    }
}
