//! f32 ↔ f16/bf16 slice conversions with the CPU's vector instructions, into uninitialised
//! memory.
//!
//! The `half` crate's slice conversions call a non-inlined function per 8 values and write into
//! initialised slices only (so buffers get zeroed first): in an f16 training step on burn-flex
//! they took 16% of the time. Here f16 uses AVX-512F's 16-lane conversion (or F16C's 8-lane one)
//! chosen at run time, and bf16, which is the top half of an f32, plain loops that vectorise.
//! Rounding is to nearest, ties to even, as in `half` (the same bits: a test checks).

use std::mem::MaybeUninit;

use half::{bf16, f16};

/// A 16-bit float format the conversions serve.
pub trait HalfFloat: Copy + Send + Sync {
    /// `dst[i] = src[i]` as f32 (exact).
    fn widen(src: &[Self], dst: &mut [MaybeUninit<f32>]);
    /// `dst[i] = src[i]` rounded to this format (to nearest, ties to even).
    fn narrow(src: &[f32], dst: &mut [MaybeUninit<Self>]);

    /// [`HalfFloat::narrow`] into initialised memory.
    fn narrow_slice(src: &[f32], dst: &mut [Self]) {
        // SAFETY: the conversion writes only initialised values.
        Self::narrow(src, unsafe { as_uninit(dst) })
    }
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

impl HalfFloat for bf16 {
    fn widen(src: &[bf16], dst: &mut [MaybeUninit<f32>]) {
        bf16_to_f32(src, dst)
    }
    fn narrow(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
        f32_to_bf16(src, dst)
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
        time("f32 -> bf16, default target", || {
            f32_to_bf16_loop(black_box(&wide), as_uninit_ref(&mut bf16s))
        });
        time("bf16 -> f32, default target", || {
            bf16_to_f32_loop(black_box(&bf16s), &mut out)
        });
    }

    /// Every compiled bf16 conversion (default target, AVX2, AVX-512) gives the same bits.
    fn bf16_variants_agree(halves: &[u16], floats: &[f32]) {
        let bf16s: Vec<bf16> = halves.iter().map(|&b| bf16::from_bits(b)).collect();
        let widen = |f: &dyn Fn(&[bf16], &mut [MaybeUninit<f32>])| {
            let mut out = vec![0.0f32; bf16s.len()];
            f(&bf16s, as_uninit_ref(&mut out));
            out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let narrow = |f: &dyn Fn(&[f32], &mut [MaybeUninit<bf16>])| {
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
