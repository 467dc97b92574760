//! One f32 matrix product on strided slices, always single-threaded.
//!
//! The kernels parallelise over samples themselves; a GEMM that split its own work across threads
//! would make the summation order depend on the thread count.

/// A read-only matrix view: `rows x cols`, element `(i, j)` at `data[i * row_stride + j *
/// col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Mat<'a> {
    /// A row-major matrix with `cols` columns.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix with `cols` columns.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            col_stride: cols,
        }
    }

    /// Whether every element of an `rows x cols` view lies inside the slice.
    fn covers(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.data.len()
    }
}

/// `dst = a · b` (or `dst += a · b` when `accumulate`), where `a` is `m x k`, `b` is `k x n` and
/// `dst` is row-major `m x n`.
pub(crate) fn matmul(
    dst: &mut [f32],
    a: Mat<'_>,
    b: Mat<'_>,
    (m, k, n): (usize, usize, usize),
    accumulate: bool,
) {
    assert!(dst.len() >= m * n, "gemm: destination too small");
    assert!(a.covers(m, k) && b.covers(k, n), "gemm: operand too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: the asserts above keep every index the product reads or writes inside the three
    // slices, `dst` is borrowed mutably so it cannot alias `a` or `b`, and `Parallelism::None`
    // runs the whole product on this thread.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            ::gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_matches_the_definition() {
        // a: 2x3, b: 3x2 given transposed (stored as 2x3 row-major).
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let bt = [7.0, 9.0, 11.0, 8.0, 10.0, 12.0];
        let mut dst = [1.0; 4];
        matmul(
            &mut dst,
            Mat::rows(&a, 3),
            Mat::transposed(&bt, 3),
            (2, 3, 2),
            false,
        );
        assert_eq!(dst, [58.0, 64.0, 139.0, 154.0]);
        matmul(
            &mut dst,
            Mat::rows(&a, 3),
            Mat::transposed(&bt, 3),
            (2, 3, 2),
            true,
        );
        assert_eq!(dst, [116.0, 128.0, 278.0, 308.0]);
    }
}
