//! The element formats a kernel reads and writes: f32, and burn-flex's f16 and bf16.
//!
//! The kernels compute in f32. A half-precision operand is widened piece by piece, where it is
//! used (one GEMM tile's block, one sample), and a half-precision result is computed in a
//! per-task f32 buffer and rounded into place. So only half tensors ever exist whole: widening a
//! whole tensor first would allocate an f32 copy twice its size, and a half-precision run would
//! use more memory than an f32 one. Widening is exact and rounding happens once per element, so
//! the values are those of widening everything first.

use std::borrow::Cow;
use std::ops::Range;

use std::mem::MaybeUninit;

use half::{bf16, f16};
use rayon::prelude::*;

use super::convert::{HalfFloat, as_uninit};
use super::{assume_init, build_in_parallel_uninit, build_in_parallel_with, uninit};

/// The storage format of a kernel's operand or result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    F32,
    F16,
    Bf16,
}

/// A borrowed run of values in one of the [`Format`]s.
#[derive(Debug, Clone, Copy)]
pub enum Values<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl<'a> From<&'a [f32]> for Values<'a> {
    fn from(values: &'a [f32]) -> Self {
        Values::F32(values)
    }
}

impl<'a, const N: usize> From<&'a [f32; N]> for Values<'a> {
    fn from(values: &'a [f32; N]) -> Self {
        Values::F32(values)
    }
}

impl<'a> From<&'a Vec<f32>> for Values<'a> {
    fn from(values: &'a Vec<f32>) -> Self {
        Values::F32(values)
    }
}

impl<'a> Values<'a> {
    pub fn len(self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F16(v) => v.len(),
            Values::Bf16(v) => v.len(),
        }
    }

    pub fn format(self) -> Format {
        match self {
            Values::F32(_) => Format::F32,
            Values::F16(_) => Format::F16,
            Values::Bf16(_) => Format::Bf16,
        }
    }

    /// The values from `start` on.
    pub fn tail(self, start: usize) -> Self {
        match self {
            Values::F32(v) => Values::F32(&v[start..]),
            Values::F16(v) => Values::F16(&v[start..]),
            Values::Bf16(v) => Values::Bf16(&v[start..]),
        }
    }

    /// `out.len()` values from `start` on, widened to f32 into `out`.
    pub fn widen_into(self, start: usize, out: &mut [f32]) {
        // SAFETY: the conversion writes only initialised values.
        self.widen_into_uninit(start, unsafe { as_uninit(out) });
    }

    /// `out.len()` values from `start` on, widened to f32 into `out`, which they initialise.
    pub fn widen_into_uninit(self, start: usize, out: &mut [MaybeUninit<f32>]) {
        let range = start..start + out.len();
        match self {
            Values::F32(v) => {
                for (o, &v) in out.iter_mut().zip(&v[range]) {
                    o.write(v);
                }
            }
            Values::F16(v) => f16::widen(&v[range], out),
            Values::Bf16(v) => bf16::widen(&v[range], out),
        }
    }

    /// The values of `range` widened into `out`, which they replace (no zeroing first).
    fn widen_to_vec(self, range: Range<usize>, out: &mut Vec<f32>) {
        out.clear();
        out.reserve(range.len());
        self.widen_into_uninit(range.start, &mut out.spare_capacity_mut()[..range.len()]);
        // SAFETY: the first `range.len()` elements were just written.
        unsafe { out.set_len(range.len()) };
    }

    /// The values of `range` as f32: borrowed when they are f32, widened into `scratch`
    /// otherwise (a buffer the caller reuses from one read to the next).
    pub fn read<'s>(self, range: Range<usize>, scratch: &'s mut Vec<f32>) -> &'s [f32]
    where
        'a: 's,
    {
        match self {
            Values::F32(v) => &v[range],
            _ => {
                self.widen_to_vec(range, scratch);
                scratch
            }
        }
    }

    /// The values of `range` as f32: borrowed when they are f32, widened otherwise.
    pub fn f32_range(self, range: Range<usize>) -> Cow<'a, [f32]> {
        match self {
            Values::F32(v) => Cow::Borrowed(&v[range]),
            _ => {
                let mut out = Vec::new();
                self.widen_to_vec(range, &mut out);
                Cow::Owned(out)
            }
        }
    }

    /// All the values widened to f32 (a copy for f32 too), chunk by chunk on the pool.
    pub fn widened_on_pool(self) -> Vec<f32> {
        let widen_chunk =
            |i: usize, out: &mut [MaybeUninit<f32>]| self.widen_into_uninit(i * CONVERT_CHUNK, out);
        // SAFETY: each chunk is widened whole into its part of the buffer.
        unsafe { build_in_parallel_uninit(self.len(), CONVERT_CHUNK, widen_chunk) }
    }

    /// All the values as f32 (borrowed when they are f32): for small operands such as a
    /// convolution's weights.
    pub fn to_f32(self) -> Cow<'a, [f32]> {
        self.f32_range(0..self.len())
    }
}

/// Half-precision operands up to this many elements (1 MiB as f32) are widened whole, once per
/// product, rather than block by block in every tile that reads them: a tile widens its rows of
/// one factor and its columns of the other, so a factor read by several tiles is widened
/// several times (the MLP's activations at batch 128 up to 7 times), and widening them once made
/// an f16 MLP step on burn-flex faster. Larger operands (a large batch's activations) stay half
/// and are widened tile by tile, so the memory saving stays.
pub const WIDEN_WHOLE_MAX: usize = 1 << 18;

/// Values that are either borrowed or owned: a tensor's elements as a backend hands them out
/// (a copy only for strided storage), or a product's operand widened whole.
pub enum Held<'a> {
    Borrowed(Values<'a>),
    Owned(Buffer),
}

impl<'a> Held<'a> {
    pub fn values(&self) -> Values<'_> {
        match self {
            Held::Borrowed(values) => *values,
            Held::Owned(buffer) => buffer.values(),
        }
    }

    /// A product's operand as the tiles will read it: `values` themselves, or widened whole
    /// when they are a small half-precision operand ([`WIDEN_WHOLE_MAX`]).
    pub fn operand(values: Values<'a>) -> Self {
        match values {
            Values::F16(_) | Values::Bf16(_) if values.len() <= WIDEN_WHOLE_MAX => {
                Held::Owned(Buffer::F32(values.widened_on_pool()))
            }
            _ => Held::Borrowed(values),
        }
    }
}

/// An owned buffer of values in one of the [`Format`]s.
#[derive(Debug, Clone, PartialEq)]
pub enum Buffer {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl Buffer {
    pub fn values(&self) -> Values<'_> {
        match self {
            Buffer::F32(v) => Values::F32(v),
            Buffer::F16(v) => Values::F16(v),
            Buffer::Bf16(v) => Values::Bf16(v),
        }
    }

    pub fn len(&self) -> usize {
        self.values().len()
    }

    /// `values` in `format`, rounded (to nearest, ties to even) when it is a half format.
    pub fn from_f32(values: Vec<f32>, format: Format) -> Self {
        match format {
            Format::F32 => Buffer::F32(values),
            _ => Self::from_f32_slice(&values, format),
        }
    }

    /// A copy of `values` in `format`, rounded (to nearest, ties to even) when it is a half
    /// format. Converted on the pool, with the CPU's vector conversions.
    pub fn from_f32_slice(values: &[f32], format: Format) -> Self {
        fn narrow<T: HalfFloat>(values: &[f32]) -> Vec<T> {
            let narrow_chunk = |i: usize, out: &mut [MaybeUninit<T>]| {
                T::narrow(&values[i * CONVERT_CHUNK..][..out.len()], out)
            };
            // SAFETY: each conversion writes its whole chunk.
            unsafe { build_in_parallel_uninit(values.len(), CONVERT_CHUNK, narrow_chunk) }
        }
        match format {
            Format::F32 => Buffer::F32(values.to_vec()),
            Format::F16 => Buffer::F16(narrow(values)),
            Format::Bf16 => Buffer::Bf16(narrow(values)),
        }
    }

    /// The values as f32 (a copy for the half formats).
    pub fn into_f32(self) -> Vec<f32> {
        match self {
            Buffer::F32(v) => v,
            other => other.values().widened_on_pool(),
        }
    }
}

/// Elements per rayon task of a plain conversion.
const CONVERT_CHUNK: usize = 1 << 15;

/// A buffer of `len` values in `format`, built in chunks of `chunk` elements on the pool:
/// `fill(i, out)` writes chunk `i` in f32 (`out` starts zeroed). For a half format each chunk is
/// written into an f32 buffer of its task and rounded into place.
pub fn build_as<F>(format: Format, len: usize, chunk: usize, fill: F) -> Buffer
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    build_as_with(format, len, chunk, |i, out| fill(i, out)).0
}

/// [`build_as`], where each chunk's task also returns a value: those come back in chunk order.
pub fn build_as_with<F, R>(format: Format, len: usize, chunk: usize, fill: F) -> (Buffer, Vec<R>)
where
    F: Fn(usize, &mut [f32]) -> R + Sync,
    R: Send,
{
    fn rounded<T, F, R>(len: usize, chunk: usize, fill: F) -> (Vec<T>, Vec<R>)
    where
        T: HalfFloat,
        F: Fn(usize, &mut [f32]) -> R + Sync,
        R: Send,
    {
        let mut buffer = uninit(len);
        let results = buffer
            .par_chunks_mut(chunk.max(1))
            .enumerate()
            .map(|(i, out)| {
                let mut wide = vec![0.0f32; out.len()];
                let result = fill(i, &mut wide);
                T::narrow(&wide, out);
                result
            })
            .collect();
        // SAFETY: every chunk was written by its conversion.
        (unsafe { assume_init(buffer) }, results)
    }
    match format {
        Format::F32 => {
            let (v, r) = build_in_parallel_with(len, chunk, fill);
            (Buffer::F32(v), r)
        }
        Format::F16 => {
            let (v, r) = rounded(len, chunk, fill);
            (Buffer::F16(v), r)
        }
        Format::Bf16 => {
            let (v, r) = rounded(len, chunk, fill);
            (Buffer::Bf16(v), r)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_buffers_round_once_and_widen_exactly() {
        let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.001 + 1.0 / 3.0).collect();
        for format in [Format::F16, Format::Bf16] {
            let buffer = Buffer::from_f32(values.clone(), format);
            assert_eq!(buffer.values().format(), format);
            let wide = buffer.values().to_f32().into_owned();
            let want: Vec<f32> = match format {
                Format::F16 => values.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
                _ => values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
            };
            assert_eq!(wide, want);
            assert_ne!(wide, values, "{format:?} must round");
            let mut part = vec![0.0; 10];
            buffer.values().widen_into(500, &mut part);
            assert_eq!(part, want[500..510]);
        }
        let f32s = Buffer::from_f32(values.clone(), Format::F32);
        assert!(matches!(f32s.values().f32_range(3..9), Cow::Borrowed(_)));
        assert_eq!(f32s.into_f32(), values);
    }

    #[test]
    fn chunk_results_come_back_in_order() {
        for format in [Format::F32, Format::F16, Format::Bf16] {
            let (buffer, firsts) = build_as_with(format, 10, 3, |i, out| {
                for (j, v) in out.iter_mut().enumerate() {
                    *v = (i * 3 + j) as f32;
                }
                i * 3
            });
            assert_eq!(firsts, vec![0, 3, 6, 9]);
            assert_eq!(
                buffer.into_f32(),
                (0..10).map(|v| v as f32).collect::<Vec<_>>()
            );
        }
    }
}
