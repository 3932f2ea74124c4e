//! Matrices over borrowed slices, and their `f32` products through `gemm`, with strides
//! standing in for every transpose and accumulation in place.

/// `scale·mᵀ` for a row-major `[rows, cols]` matrix `m`.
pub fn transposed(m: &[f32], rows: usize, cols: usize, scale: f32) -> Vec<f32> {
    assert_eq!(m.len(), rows * cols, "not a [{rows}, {cols}] matrix");
    (0..cols)
        .flat_map(|col| m[col..].iter().step_by(cols).map(move |v| scale * v))
        .collect()
}

/// A matrix over a slice, element `(i, j)` at `i·row_stride + j·col_stride`: a row-major
/// matrix or, with the strides swapped, its transpose.
#[derive(Clone, Copy)]
pub struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
}

impl<'a> View<'a> {
    /// A row-major `[rows, cols]` matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "not a [{rows}, {cols}] matrix");
        Self {
            data,
            rows,
            cols,
            row_stride: cols as isize,
            col_stride: 1,
        }
    }

    /// `[rows, cols]` with element `(i, j)` at `data[i·row_stride + j·col_stride]`: how a
    /// tensor lies in its storage, transposed or not.
    pub fn strided(
        data: &'a [f32],
        [rows, cols]: [usize; 2],
        [row_stride, col_stride]: [isize; 2],
    ) -> Self {
        assert!(
            row_stride >= 0 && col_stride >= 0,
            "a matrix with negative strides"
        );
        let last =
            (rows.max(1) - 1) * row_stride as usize + (cols.max(1) - 1) * col_stride as usize;
        assert!(
            rows * cols == 0 || last < data.len(),
            "a view past its storage"
        );
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    /// The elements from the first on.
    pub fn data(&self) -> &'a [f32] {
        self.data
    }

    /// The transpose, over the same elements.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
}

/// `scale·lhs·rhs` in a new row-major buffer. Not zeroed first: the product writes every
/// element, and zeroing was a pass over each output for nothing (3% of a MiniLM f32 step).
pub fn gemm(lhs: View, rhs: View, scale: f32) -> Vec<f32> {
    let len = lhs.rows * rhs.cols;
    let mut out = Vec::with_capacity(len);
    // SAFETY: the buffer holds `len` elements; without `accumulate` the product writes every
    // one of them and reads none.
    unsafe {
        gemm_into(out.as_mut_ptr(), false, lhs, rhs, scale);
        out.set_len(len);
    }
    out
}

/// `out += scale·lhs·rhs`; `out` is row-major.
pub fn gemm_accumulate(out: &mut [f32], lhs: View, rhs: View, scale: f32) {
    assert_eq!(
        out.len(),
        lhs.rows * rhs.cols,
        "output is not [{}, {}]",
        lhs.rows,
        rhs.cols
    );
    // SAFETY: `out` holds the whole initialised output.
    unsafe { gemm_into(out.as_mut_ptr(), true, lhs, rhs, scale) }
}

/// `out = scale·lhs·rhs`, or `out += scale·lhs·rhs` when `accumulate`; `out` is row-major.
///
/// # Safety
/// `out` must point at `lhs.rows × rhs.cols` writable elements, initialised when `accumulate`.
unsafe fn gemm_into(out: *mut f32, accumulate: bool, lhs: View, rhs: View, scale: f32) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            // SAFETY: the caller's promise: `m × n` writable elements.
            unsafe { std::ptr::write_bytes(out, 0, m * n) };
        }
        return;
    }
    // burn's own threshold: below it, splitting a product costs more than it saves (and the
    // trainer already runs batch shards in parallel).
    let parallelism = if m * n * k >= 192 * 192 * 192 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: both views lie within their slices (`View::rows` checked the lengths, and a
    // transpose visits the same elements), `out` is an `[m, n]` row-major buffer (the
    // caller's promise), and the slices are borrowed for the whole call.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride,
            lhs.row_stride,
            rhs.data.as_ptr(),
            rhs.col_stride,
            rhs.row_stride,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}
