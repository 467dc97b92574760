//! f32 matrix products on strided slices: one product, always single-threaded ([`matmul`]), and
//! a product spread over rayon in fixed output tiles ([`for_each_tile`], [`Tile::matmul`]).
//!
//! The kernels parallelise over samples or output tiles themselves, and call gemm one tile at a
//! time: the tiles are where the fused epilogues (bias, ReLU masks) and the widening of
//! half-precision blocks happen. gemm's own threading would not change a sum either: it takes
//! its depth block from the shapes alone and runs the depth loop outermost, and
//! `gemm_threads` below checks its products bit for bit at 1 to 8 threads. That holds for gemm
//! 0.19.0, which the workspace pins exactly.

use std::borrow::Cow;
use std::marker::PhantomData;
use std::mem::MaybeUninit;

use half::{bf16, f16};
use rayon::prelude::*;

use super::convert::HalfFloat;
use super::values::{Buffer, Format, Values};

/// A read-only matrix view: `rows x cols`, element `(i, j)` at `data[i * row_stride + j *
/// col_stride]`, in any [`Format`](super::values::Format): the products widen half-precision
/// blocks to f32 where they use them.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: Values<'a>,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Mat<'a> {
    /// A row-major matrix with `cols` columns.
    pub fn rows(data: impl Into<Values<'a>>, cols: usize) -> Self {
        Self {
            data: data.into(),
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix with `cols` columns.
    pub fn transposed(data: impl Into<Values<'a>>, cols: usize) -> Self {
        Self {
            data: data.into(),
            row_stride: 1,
            col_stride: cols,
        }
    }

    /// The view that starts at element `(row, col)` of this one.
    pub fn offset(self, row: usize, col: usize) -> Self {
        let start = (row * self.row_stride + col * self.col_stride).min(self.data.len());
        Self {
            data: self.data.tail(start),
            ..self
        }
    }

    /// Whether every element of an `rows x cols` view lies inside the slice.
    fn covers(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.data.len()
    }

    /// The `rows x cols` block at the start of this view, in f32: the view itself when it holds
    /// f32, else a widened compact copy in the same orientation (row- or column-major), so that
    /// the GEMM reads it the way it would read the original.
    fn widened(self, rows: usize, cols: usize) -> Wide<'a> {
        assert!(self.covers(rows, cols), "gemm: operand too small");
        if let Values::F32(data) = self.data {
            return Wide {
                data: Cow::Borrowed(data),
                row_stride: self.row_stride,
                col_stride: self.col_stride,
            };
        }
        // Views are made by `Mat::rows` or `Mat::transposed`: one of the strides is 1.
        let row_major = self.col_stride == 1;
        assert!(
            row_major || self.row_stride == 1,
            "gemm: a strided half-precision view"
        );
        let (row_stride, col_stride) = if row_major { (cols, 1) } else { (1, rows) };
        let mut data = Vec::with_capacity(rows * cols);
        let out = &mut data.spare_capacity_mut()[..rows * cols];
        if rows * cols > 0 {
            let (lines, line_len, line_stride) = if row_major {
                (rows, cols, self.row_stride)
            } else {
                (cols, rows, self.col_stride)
            };
            debug_assert_eq!(lines * line_len, out.len());
            for (line, out) in out.chunks_exact_mut(line_len).enumerate() {
                self.data.widen_into_uninit(line * line_stride, out);
            }
        }
        // SAFETY: the loops above wrote all `rows * cols` elements.
        unsafe { data.set_len(rows * cols) };
        Wide {
            data: Cow::Owned(data),
            row_stride,
            col_stride,
        }
    }
}

/// An f32 operand of one GEMM call.
struct Wide<'a> {
    data: Cow<'a, [f32]>,
    row_stride: usize,
    col_stride: usize,
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
    // SAFETY: `dst` holds `m x n` initialised elements at row stride `n` and is borrowed mutably,
    // so nothing else reads or writes it.
    unsafe { matmul_raw(dst.as_mut_ptr(), n, a, b, (m, k, n), accumulate) }
}

/// [`matmul`] into a raw row-major destination with row stride `dst_stride`.
///
/// # Safety
/// The `m x n` elements `dst[i * dst_stride + j]` must be valid for writes and touched by nobody
/// else during the call; when `accumulate`, they must also be initialised. `a` and `b` must not
/// overlap them.
unsafe fn matmul_raw(
    dst: *mut f32,
    dst_stride: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    (m, k, n): (usize, usize, usize),
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // SAFETY: row `i` of the destination, valid for writes (the caller's contract).
                unsafe { std::ptr::write_bytes(dst.add(i * dst_stride), 0, n) };
            }
        }
        return;
    }
    let (a, b) = (a.widened(m, k), b.widened(k, n));
    // SAFETY: `widened` asserted that every index the product reads lies inside `a` and `b`, the caller
    // vouches for the destination, and `Parallelism::None` runs the whole product on this
    // thread: the order of every sum depends on the shapes only.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_stride as isize,
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

/// Where a tiled product's tasks write: a row-major matrix of `T` with `cols` columns, each task
/// in its own tile.
struct SharedDst<T> {
    ptr: *mut T,
    cols: usize,
}

impl<T> SharedDst<T> {
    /// Element `(row, col)` of the matrix.
    ///
    /// # Safety
    /// `(row, col)` must lie inside the matrix.
    unsafe fn at(self, row: usize, col: usize) -> *mut T {
        // SAFETY: the caller's contract.
        unsafe { self.ptr.add(row * self.cols + col) }
    }
}

impl<T> Clone for SharedDst<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for SharedDst<T> {}

// SAFETY: tasks reach the matrix only through disjoint tiles, each writing its own elements
// from its own thread: the elements must be safe to hand to another thread.
unsafe impl<T: Send> Send for SharedDst<T> {}
unsafe impl<T: Send> Sync for SharedDst<T> {}

/// One tile of a matrix being computed by [`for_each_tile`]: rows `row..row + rows`, columns
/// `col..col + cols`, owned by one task and written in f32 on its canvas (the matrix itself, or a
/// buffer of the task that is rounded into a half-precision matrix afterwards). It starts
/// uninitialised: [`Tile::fill_rows`] or a [`Tile::matmul`] that does not accumulate must write it
/// before anything reads it.
pub(crate) struct Tile<'a> {
    /// Element `(i, j)` of the tile is at `canvas + i * stride + j`.
    canvas: *mut f32,
    stride: usize,
    row: usize,
    col: usize,
    rows: usize,
    cols: usize,
    initialised: bool,
    _matrix: PhantomData<&'a mut [f32]>,
}

impl Tile<'_> {
    /// The matrix columns this tile covers.
    pub fn columns(&self) -> std::ops::Range<usize> {
        self.col..self.col + self.cols
    }

    /// The first element of the tile's row `i`.
    ///
    /// # Safety
    /// `i < self.rows` (the row then lies inside the canvas), or `i == 0` (no offset at all).
    unsafe fn ptr(&self, i: usize) -> *mut f32 {
        // SAFETY: the caller's contract.
        unsafe { self.canvas.add(i * self.stride) }
    }

    /// Sets every row of the tile to `values[col..col + cols]` (a bias, say).
    pub fn fill_rows(&mut self, values: &[f32]) {
        let values = &values[self.col..self.col + self.cols];
        for i in 0..self.rows {
            // SAFETY: row `i` of this tile: inside the canvas, owned by this task only.
            unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), self.ptr(i), self.cols) };
        }
        self.initialised = true;
    }

    /// `tile = a · b` over the tile's rows and columns (`+=` when `accumulate`), where `a` is the
    /// left factor of the whole matrix (`rows x k`) and `b` the right one (`k x cols`): the whole
    /// sum over `k` of every element happens in this one call, on this thread. Half-precision
    /// factors are widened block by block: only the tile's rows of `a` and columns of `b`.
    ///
    /// # Panics
    /// When accumulating onto a tile not written yet.
    pub fn matmul(&mut self, a: Mat<'_>, b: Mat<'_>, k: usize, accumulate: bool) {
        self.matmul_block(a, b.offset(0, self.col), k, accumulate);
    }

    /// [`Tile::matmul`] with the right factor given as this tile's own `k x cols` block, not as
    /// the whole matrix's.
    ///
    /// # Panics
    /// When accumulating onto a tile not written yet.
    pub fn matmul_block(&mut self, a: Mat<'_>, b_block: Mat<'_>, k: usize, accumulate: bool) {
        assert!(
            self.initialised || !accumulate,
            "tile: accumulating onto uninitialised memory"
        );
        let (a, b) = (a.offset(self.row, 0), b_block);
        // SAFETY: the tile lies inside the canvas, no other task touches it, it is initialised
        // when accumulating (asserted), and the factors are shared borrows of other buffers.
        unsafe {
            matmul_raw(
                self.ptr(0),
                self.stride,
                a,
                b,
                (self.rows, k, self.cols),
                accumulate,
            )
        };
        self.initialised = true;
    }

    /// Hands every row of the tile (zeroed first) to `f`, which writes it.
    pub fn write_rows(&mut self, mut f: impl FnMut(usize, &mut [f32])) {
        for i in 0..self.rows {
            // SAFETY: row `i` of this tile: inside the canvas, owned by this task only; zeroed
            // before the slice is made, so it is initialised.
            let row = unsafe {
                std::ptr::write_bytes(self.ptr(i), 0, self.cols);
                std::slice::from_raw_parts_mut(self.ptr(i), self.cols)
            };
            f(self.row + i, row);
        }
        self.initialised = true;
    }

    /// Applies `f` to every row of the tile (a slice of `cols` elements).
    ///
    /// # Panics
    /// When the tile was not written yet.
    pub fn for_each_row(&mut self, mut f: impl FnMut(usize, &mut [f32])) {
        assert!(self.initialised, "tile: reading uninitialised memory");
        for i in 0..self.rows {
            // SAFETY: row `i` of this tile, initialised, owned by this task only.
            let row = unsafe { std::slice::from_raw_parts_mut(self.ptr(i), self.cols) };
            f(self.row + i, row);
        }
    }
}

/// Computes a row-major `rows x cols` matrix in `format`, tile by tile: the matrix is cut into
/// tiles of at most `tile_rows x tile_cols` ([`balanced`] sizes; smaller ones when that leaves
/// fewer tiles than threads, see [`tile_size`], which cuts deeper where the tiles hold products
/// whose sums are `depth` deep) and rayon runs `f` once per tile, which must write all of it (in
/// f32; a half-precision matrix gets each tile rounded into place). Every element is computed by
/// the same operations, in the same order, at any thread count; only which thread runs it
/// changes.
///
/// # Panics
/// When a tile is left unwritten, or on a zero tile size.
pub(crate) fn for_each_tile<F>(
    format: Format,
    shape: (usize, usize),
    tile: (usize, usize),
    depth: Option<usize>,
    f: F,
) -> Buffer
where
    F: Fn(&mut Tile<'_>) + Sync,
{
    match format {
        Format::F32 => Buffer::F32(tiled::<f32, _>(shape, tile, depth, f)),
        Format::F16 => Buffer::F16(tiled::<f16, _>(shape, tile, depth, f)),
        Format::Bf16 => Buffer::Bf16(tiled::<bf16, _>(shape, tile, depth, f)),
    }
}

/// [`for_each_tile`] over an f32 matrix that is already written: `f` rewrites each tile in
/// place. The tiles are those [`for_each_tile`] cuts a matrix of this shape into without a
/// `depth`, so a pass over a matrix that such a product has just written finds each tile where
/// the product left it.
///
/// # Panics
/// When `matrix` is not `rows x cols`, or on a zero tile size.
pub(crate) fn for_each_tile_in_place<F>(
    matrix: &mut [f32],
    shape: (usize, usize),
    tile: (usize, usize),
    f: F,
) where
    F: Fn(&mut Tile<'_>) + Sync,
{
    assert_eq!(matrix.len(), shape.0 * shape.1, "tile: matrix size");
    // SAFETY: `matrix` holds `rows x cols` initialised elements (asserted) and is borrowed
    // mutably for the whole call.
    unsafe { each_tile(matrix.as_mut_ptr(), shape, tile, None, true, f) };
}

/// An element type a tiled product can write: f32 in place, the half formats through a buffer.
trait TileElement: Copy + Send + Sync {
    /// `dst` as f32 elements when tiles can be written there in place (f32 itself).
    fn in_place(dst: *mut Self) -> Option<*mut f32>;

    /// Writes `values` rounded to this type at `dst` (valid for `values.len()` writes).
    ///
    /// # Safety
    /// `dst` must be valid for writes of `values.len()` elements that nobody else touches.
    unsafe fn store(values: &[f32], dst: *mut Self);
}

impl TileElement for f32 {
    fn in_place(dst: *mut f32) -> Option<*mut f32> {
        Some(dst)
    }

    unsafe fn store(values: &[f32], dst: *mut f32) {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), dst, values.len()) }
    }
}

impl<T: HalfFloat> TileElement for T {
    fn in_place(_: *mut T) -> Option<*mut f32> {
        None
    }

    unsafe fn store(values: &[f32], dst: *mut T) {
        // SAFETY: the caller's contract: `values.len()` elements at `dst`, ours alone.
        let dst = unsafe { std::slice::from_raw_parts_mut(dst.cast(), values.len()) };
        T::narrow(values, dst);
    }
}

/// Above this many rows or columns, `gemm` (0.19, `gemm_basic_generic`) blocks the sum over `k`
/// of every element of a product by the depth `k` alone (`kernel_params`); a product at most
/// this size both ways is summed in blocks of 512 instead, and one of at most 16 x 16 elements
/// or one row or column wide by yet other kernels. A `gemm` upgrade must keep
/// `linear_results_do_not_depend_on_the_thread_count` passing.
const GEMM_LARGE_ABOVE: usize = 64;

/// `gemm`'s depth block for products at most [`GEMM_LARGE_ABOVE`] both ways: a sum at most this
/// deep is one block whatever the product's size (large products block the depth by 512 or more
/// before splitting it evenly).
const GEMM_SMALL_DEPTH_BLOCK: usize = 512;

/// At most this many elements, `gemm` sums each element of a product with a horizontal kernel of
/// its own (a vector reduction, not one accumulator): no tile is cut this small.
const GEMM_HORIZONTAL_UP_TO: usize = 16 * 16;

/// The narrowest tile that [`tile_size`] cuts.
const NARROWEST_CUT: usize = 16;

/// f32 lanes of the widest vectors (AVX-512): tile sides are rounded up to a multiple of it.
const VECTOR: usize = 16;

/// The tile size of a `rows x cols` product on `threads` threads: the caller's largest tile in
/// [`balanced`] sizes, then, while that leaves fewer tiles than threads, its columns (else its
/// rows) in halves. A side is only cut while every tile stays over [`GEMM_LARGE_ABOVE`] the
/// other way and at least [`NARROWEST_CUT`] this way: each element then goes through the same
/// `gemm` kernel and depth blocks as in the uncut tile, so the cut changes which thread computes
/// it, never how. Uncut, the MLP's forward products at batch 128 (four 128 x 128 tiles) kept at
/// most four of 16 threads busy. Where every element is a sum at most [`GEMM_SMALL_DEPTH_BLOCK`]
/// deep (`depth`), tiles within 64 x 64 sum it in one block too, and rows are also cut down to
/// tiles of over [`GEMM_HORIZONTAL_UP_TO`] elements: the MLP's 10-output product at batch 128, one
/// tile uncut and a visible share of a 2-thread step, runs as two. Other tiles narrower than 64
/// the other way are not cut at all.
fn tile_size(
    (rows, cols): (usize, usize),
    (max_rows, max_cols): (usize, usize),
    depth: Option<usize>,
    threads: usize,
) -> (usize, usize) {
    let (mut tile_rows, mut tile_cols) = (balanced(rows, max_rows), balanced(cols, max_cols));
    if rows == 0 || cols == 0 {
        return (tile_rows, tile_cols);
    }
    let shallow = depth.is_some_and(|k| k <= GEMM_SMALL_DEPTH_BLOCK);
    while rows.div_ceil(tile_rows) * cols.div_ceil(tile_cols) < threads {
        if let Some(cut) = halved(cols, tile_cols).filter(|_| all_large(rows, tile_rows)) {
            tile_cols = cut;
        } else if let Some(cut) = halved(rows, tile_rows).filter(|&cut| {
            let smallest = last_part(rows, cut) * last_part(cols, tile_cols);
            all_large(cols, tile_cols) || (shallow && smallest > GEMM_HORIZONTAL_UP_TO)
        }) {
            tile_rows = cut;
        } else {
            break;
        }
    }
    (tile_rows, tile_cols)
}

/// The size of twice as many parts of `n` as parts of `size` make (rounded up to a whole number
/// of vectors, as in [`balanced`]), when that is smaller and no part is narrower than
/// [`NARROWEST_CUT`].
fn halved(n: usize, size: usize) -> Option<usize> {
    let half = n.div_ceil(2 * n.div_ceil(size)).next_multiple_of(VECTOR);
    (half < size && last_part(n, half) >= NARROWEST_CUT).then_some(half)
}

/// Whether every part of `n` cut in parts of `size` is over [`GEMM_LARGE_ABOVE`].
fn all_large(n: usize, size: usize) -> bool {
    last_part(n, size) > GEMM_LARGE_ABOVE
}

/// The last (smallest) part of `n` cut in parts of `size`.
fn last_part(n: usize, size: usize) -> usize {
    n - (n.div_ceil(size) - 1) * size
}

/// The size of the parts that `n` is cut into: as few parts of at most `max` as fit, of equal
/// size rounded up to a multiple of [`VECTOR`] (a whole number of vectors). Cutting 784 rows into
/// six tiles of 128 and one of 16 left the threads of a 2-thread pool with 7 and 5.25 tiles' work.
fn balanced(n: usize, max: usize) -> usize {
    let parts = n.div_ceil(max).max(1);
    n.div_ceil(parts).next_multiple_of(VECTOR).min(max)
}

fn tiled<T: TileElement, F>(
    shape: (usize, usize),
    tile: (usize, usize),
    depth: Option<usize>,
    f: F,
) -> Vec<T>
where
    F: Fn(&mut Tile<'_>) + Sync,
{
    let mut buffer: Box<[MaybeUninit<T>]> = Box::new_uninit_slice(shape.0 * shape.1);
    // SAFETY: the buffer holds `rows x cols` elements, ours alone; `each_tile` asserts that every
    // tile was written.
    unsafe {
        each_tile(
            buffer.as_mut_ptr().cast::<T>(),
            shape,
            tile,
            depth,
            false,
            f,
        )
    };
    // SAFETY: the tiles cover the matrix, and each was written by its task (asserted).
    unsafe { buffer.assume_init() }.into_vec()
}

/// Runs `f` once per tile of the `rows x cols` matrix at `matrix` on rayon (tile sizes from
/// [`tile_size`], given the `depth` of the sums the tiles hold); each tile starts `initialised`
/// or not, and must end written.
///
/// # Safety
/// `matrix` must point to `rows x cols` elements that nothing else reads or writes during the
/// call, initialised when `initialised` is set.
unsafe fn each_tile<T: TileElement, F>(
    matrix: *mut T,
    (rows, cols): (usize, usize),
    (tile_rows, tile_cols): (usize, usize),
    depth: Option<usize>,
    initialised: bool,
    f: F,
) where
    F: Fn(&mut Tile<'_>) + Sync,
{
    assert!(tile_rows > 0 && tile_cols > 0, "tile: zero size");
    let (tile_rows, tile_cols) = tile_size(
        (rows, cols),
        (tile_rows, tile_cols),
        depth,
        rayon::current_num_threads(),
    );
    let dst = SharedDst { ptr: matrix, cols };
    let (across, cols_total) = (cols.div_ceil(tile_cols), cols);
    (0..rows.div_ceil(tile_rows) * across)
        .into_par_iter()
        .for_each(|t| {
            let (row, col) = ((t / across) * tile_rows, (t % across) * tile_cols);
            let (rows, cols) = (tile_rows.min(rows - row), tile_cols.min(cols - col));
            // SAFETY: `(row, col)` lies inside the matrix.
            let corner = unsafe { dst.at(row, col) };
            // f32 tiles are written in place; others on a canvas of their task, then stored.
            let mut canvas = Vec::new();
            let (canvas_ptr, stride) = match T::in_place(corner) {
                Some(corner) => (corner, cols_total),
                None => {
                    assert!(
                        !initialised,
                        "tile: only f32 matrices are rewritten in place"
                    );
                    canvas.resize(rows * cols, 0.0f32);
                    (canvas.as_mut_ptr(), cols)
                }
            };
            let mut tile = Tile {
                canvas: canvas_ptr,
                stride,
                row,
                col,
                rows,
                cols,
                initialised,
                _matrix: PhantomData,
            };
            f(&mut tile);
            assert!(tile.initialised, "tile: left unwritten");
            if !canvas.is_empty() {
                for (i, values) in canvas.chunks_exact(cols).enumerate() {
                    // SAFETY: row `i` of this task's tile, inside the matrix, written by no
                    // other task.
                    unsafe { T::store(values, dst.at(row + i, col)) };
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_are_balanced() {
        assert_eq!(balanced(784, 128), 112);
        assert_eq!(balanced(512, 128), 128);
        assert_eq!(balanced(512, 256), 256);
        assert_eq!(balanced(130, 128), 80);
        assert_eq!(balanced(10, 256), 16);
        assert_eq!(balanced(0, 128), 0);
        assert_eq!(balanced(5, 3), 3);
    }

    #[test]
    fn tiles_are_cut_for_threads_only_where_gemm_sums_the_same_way() {
        // The MLP's forward product at batch 128: its columns are halved until every thread
        // has a tile, down to 16.
        for (threads, tile) in [(1, 128), (4, 128), (5, 64), (8, 64), (16, 32), (64, 16)] {
            assert_eq!(
                tile_size((128, 512), (128, 128), Some(784), threads),
                (128, tile)
            );
        }
        // Ten outputs cannot be cut, and cutting 128 rows would leave tiles within 64 x 64,
        // summed in other depth blocks than the 128-row tile when the sums are over 512 deep.
        assert_eq!(tile_size((128, 10), (128, 128), None, 16), (128, 16));
        assert_eq!(tile_size((128, 10), (128, 128), Some(784), 16), (128, 16));
        // At most 512 deep, the depth blocks agree: rows are cut while every tile keeps over
        // 16 x 16 elements (32 x 10 does, 16 x 10 would not), after the columns.
        assert_eq!(tile_size((128, 10), (128, 128), Some(512), 1), (128, 16));
        assert_eq!(tile_size((128, 10), (128, 128), Some(512), 2), (64, 16));
        assert_eq!(tile_size((128, 10), (128, 128), Some(512), 16), (32, 16));
        assert_eq!(tile_size((128, 32), (128, 128), Some(512), 16), (32, 16));
        // 64 rows: the rows are cut while the 128 columns keep every tile large.
        assert_eq!(tile_size((64, 512), (128, 128), None, 16), (16, 128));
        // A weight gradient's 7 x 2 tiles: columns first.
        assert_eq!(tile_size((784, 512), (128, 256), None, 16), (112, 128));
        // No cut leaves a part narrower than 16: 130 columns stop at parts of 48 (48, 48, 34),
        // as parts of 32 would leave one of 2.
        assert_eq!(tile_size((128, 130), (128, 128), None, 16), (128, 48));
        assert_eq!(tile_size((0, 512), (128, 128), None, 16), (0, 128));
    }

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

/// The premise of this module, tested: does gemm's own threading change a product's bits?
/// gemm 0.19 takes its depth block from the shapes alone and runs the depth loop outermost,
/// in order, so splitting the output among threads should not change any sum. This checks it
/// at 1, 2, 3 and 8 threads against the single-threaded product, bit for bit, on the shapes
/// the built-in models multiply (batch 128; the GPT's 768 rows), depths above and below gemm's
/// small-product block included.
#[cfg(test)]
mod gemm_threads {
    use rand::{Rng, SeedableRng};

    fn product(a: &[f32], b: &[f32], (m, k, n): (usize, usize, usize), threads: usize) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        let parallelism = match threads {
            1 => ::gemm::Parallelism::None,
            n => ::gemm::Parallelism::Rayon(n),
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        // SAFETY: `a` is m x k, `b` k x n and `c` m x n, all row-major and as long as that.
        pool.install(|| unsafe {
            ::gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                b.as_ptr(),
                1,
                n as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        });
        c
    }

    #[test]
    fn gemm_gives_the_same_bits_at_any_thread_count() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let shapes = [
            (128, 784, 512), // MLP: first layer forward
            (784, 128, 512), // its weight gradient
            (128, 512, 512),
            (128, 512, 10),
            (128, 10, 512),
            (768, 128, 384), // GPT: attention's input projection
            (768, 512, 128), // the MLP's down projection
            (128, 768, 512), // a weight gradient summed over 768 rows
            (64, 1600, 128), // CNN: the dense layer
        ];
        for (m, k, n) in shapes {
            let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let one = product(&a, &b, (m, k, n), 1);
            for threads in [2, 3, 8] {
                let many = product(&a, &b, (m, k, n), threads);
                let same = one
                    .iter()
                    .zip(&many)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "({m}, {k}, {n}) at {threads} threads");
            }
        }
    }
}
