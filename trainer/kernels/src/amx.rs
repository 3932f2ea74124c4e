//! bf16 matrix products on Intel AMX tiles, for the frozen weights of a LoRA model.
//!
//! A frozen projection multiplies activations by the same weight every step, so the weight is
//! rounded to bf16 and laid out the way the tile unit reads it once ([`Packed`]), and each
//! product only rounds its activations. Products of bf16 operands are summed in f32 (the tile
//! unit accumulates in f32), as PyTorch's bf16 CPU matmul does.
//!
//! The tile instructions are written as inline assembly because Rust's AMX intrinsics are
//! unstable.

use rayon::prelude::*;

use crate::dispatch::{Isa, Kernel, MulAdd};
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Tile geometry: a tile is 16 rows of 64 bytes (16 f32 or 32 bf16).
const ROWS: usize = 16;
/// bf16 values along `k` per tile row, so one tile product consumes 32 of `k`.
const K_STEP: usize = 32;
/// Rows (and columns) of the 2 × 2 tile block each step of the kernel computes.
const BLOCK: usize = 2 * ROWS;
/// `len` rounded up to whole tiles. One padding serves every dimension, rows, columns and
/// `k`, because a tile step along `k` and a block of rows or columns are both 32: that is what
/// lets [`Rounded::with_packed`] lay one matrix out both ways over the same padded shape.
fn padded(len: usize) -> usize {
    const { assert!(K_STEP == BLOCK) };
    len.div_ceil(BLOCK) * BLOCK
}

/// Elements below which packing a matrix is not worth a thread hand-off (the adapters).
const SMALL: usize = 1 << 15;
/// Row blocks per task: enough work per task to amortise loading the tile configuration,
/// few enough that a matrix splits into more tasks than threads.
const BLOCKS_PER_TASK: usize = 4;
/// Tile steps along `k` per piece of a long product (2,048 of `k`). A task walking all of a
/// long `k` for each block streams its strips and panels from L3 again and again (the output
/// head's backward, `k` = 49,152: its 3 MiB panel, read once per row block, did not stay in
/// L2, and the product ran at half the forward's rate); a piece of each of its strips and
/// panels, 128 KiB a pair, does stay, and serves every block and column of the task.
const PIECE_STEPS: usize = 64;
/// Column blocks per task in a long product: each piece of a strip loaded serves this many.
const LONG_COLS: usize = 3;

/// Whether this CPU and kernel let the process use AMX tiles for bf16 products. Linux hands
/// out the 8 KiB tile state only on request, once per process; the answer is kept.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE. The activations are rounded with
    // AVX-512, which every AMX CPU has.
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    let amx = leaf7.edx & (1 << 22) != 0 && leaf7.edx & (1 << 24) != 0;
    if !amx || !std::arch::is_x86_feature_detected!("avx512bw") {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes which xsave state the kernel lets
    // this process use; it touches no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// A buffer the tiles read: whole 64-byte lines aligned as cache lines, holding `u16`
/// (rounded activations) or `u32` (packed pairs). A tile row that straddles two lines loads
/// at a third of the speed — a tile product with its loads took 14.8 ns from a `Vec`'s
/// 16-byte alignment against 4.7 ns aligned, here — so nothing the tiles read is a plain `Vec`.
struct Lines(Vec<Line>);

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// What a [`Lines`] holds: plain integers whose size divides a line.
trait Word: Copy {}
impl Word for u16 {}
impl Word for u32 {}

impl Lines {
    /// `len` words (whole lines of them), each written by `write`.
    ///
    /// # Safety
    /// `write` must write every word of the slice it is given.
    unsafe fn written<T: Word>(len: usize, write: impl FnOnce(&mut [MaybeUninit<T>])) -> Self {
        let mut lines = Self(Vec::new());
        // SAFETY: the caller's promise.
        unsafe { lines.rewrite(len, write) };
        lines
    }

    /// What [`Lines::written`] makes, in this buffer's memory when it is large enough.
    ///
    /// # Safety
    /// As for [`Lines::written`].
    unsafe fn rewrite<T: Word>(&mut self, len: usize, write: impl FnOnce(&mut [MaybeUninit<T>])) {
        let count = Self::count::<T>(len);
        self.0.clear();
        self.0.reserve(count);
        // SAFETY: a line is 64 bytes of plain data, aligned for any word, and a word's size
        // divides it; the slice covers exactly the `count` lines reserved.
        let words = unsafe {
            std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<MaybeUninit<T>>(), len)
        };
        write(words);
        // SAFETY: the caller's promise: every word, so every line, is written.
        unsafe { self.0.set_len(count) };
    }

    fn zeroed<T: Word>(len: usize) -> Self {
        Self(vec![Line([0; 64]); Self::count::<T>(len)])
    }

    fn count<T: Word>(len: usize) -> usize {
        let bytes = len * size_of::<T>();
        assert_eq!(bytes % 64, 0, "a buffer of whole lines");
        bytes / 64
    }

    fn words_mut<T: Word>(&mut self) -> &mut [T] {
        let len = self.0.len() * 64 / size_of::<T>();
        // SAFETY: as in `written`, and every bit pattern is a valid word.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<T>(), len) }
    }

    fn as_ptr<T: Word>(&self) -> *const T {
        self.0.as_ptr().cast()
    }
}

/// The right-hand side `b` of `a · b`, `[k, n]`, rounded to bf16 and laid out for the tile
/// unit: panels of 16 columns, each `k / 2` rows of 16 column pairs `(b[2i][j], b[2i+1][j])`
/// (the "VNNI" layout `tdpbf16ps` reads), each pair one `u32` word, the even row in its low
/// half. `k` is padded to 32 and `n` to 32 with zeros.
pub struct Packed {
    k: usize,
    n: usize,
    k_padded: usize,
    n_padded: usize,
    data: Lines,
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Packed [{}, {}] bf16", self.k, self.n)
    }
}

impl Packed {
    /// Packs a row-major `[k, n]` matrix. It runs every step for the adapters and for the
    /// operands of their gradients, so it reads `b` in row order (a panel at a time strides
    /// a whole row between 64-byte reads, and every one missed the cache): a task takes a run
    /// of panels and walks the row pairs, 16 columns of two rows making one 64-byte line of a
    /// panel.
    pub fn from_rows(isa: Isa, b: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(b.len(), k * n, "matrix is not [{k}, {n}]");
        let k_padded = padded(k);
        let n_padded = padded(n);
        let panel_len = k_padded / 2 * ROWS;
        let panels = n.div_ceil(ROWS);
        let tasks = if k * n >= SMALL {
            rayon::current_num_threads().min(panels)
        } else {
            1
        };
        let per_task = panels.div_ceil(tasks).max(1);
        // Not zeroed first (a pass over it for nothing): the panels write their padding, and
        // the one panel past `n` that padding to 32 columns may leave is filled here.
        let pack = |words: &mut [MaybeUninit<u32>]| {
            let (used, spare) = words.split_at_mut(panels * panel_len);
            used.par_chunks_mut(per_task * panel_len)
                .enumerate()
                .for_each(|(task, out)| {
                    let first = task * per_task;
                    isa.run(PackPanels {
                        b,
                        k,
                        n,
                        first,
                        out,
                        panel_len,
                    })
                });
            spare.fill(MaybeUninit::new(0));
        };
        // SAFETY: `PackPanels` writes every word of its panels, and the rest is filled.
        let data = unsafe { Lines::written(n_padded / ROWS * panel_len, pack) };
        Self {
            k,
            n,
            k_padded,
            n_padded,
            data,
        }
    }

    /// Packs the transpose of a row-major `[n, k]` matrix, i.e. `b[row][col] = t[col][row]`.
    pub fn from_transposed(t: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(t.len(), k * n, "matrix is not [{n}, {k}]");
        let (k_padded, n_padded) = (padded(k), padded(n));
        let panel_len = k_padded / 2 * ROWS;
        let mut data = Lines::zeroed::<u32>(n_padded / ROWS * panel_len);
        // A pair `(b[2i][col], b[2i+1][col])` is two neighbours in `t`'s row `col`, so each
        // column reads its row of `t` in order.
        let pack_panel = |(panel, out): (usize, &mut [u32])| {
            for col in (panel * ROWS..(panel + 1) * ROWS).filter(|&c| c < n) {
                let src = &t[col * k..(col + 1) * k];
                for (pair, values) in src.chunks(2).enumerate() {
                    let odd = values.get(1).map_or(0, |&v| bf16_rounded(v) as u32);
                    out[pair * ROWS + col % ROWS] = bf16_rounded(values[0]) as u32 | odd << 16;
                }
            }
        };
        let words = data.words_mut::<u32>();
        if k * n >= SMALL {
            words
                .par_chunks_mut(panel_len)
                .enumerate()
                .for_each(pack_panel);
        } else {
            words.chunks_mut(panel_len).enumerate().for_each(pack_panel);
        }
        Self {
            k,
            n,
            k_padded,
            n_padded,
            data,
        }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }
}

/// `a · b` for a row-major `[m, k]` matrix `a`: a row-major `[m, n]` f32 matrix. Only call it
/// when [`available`] said yes.
pub fn matmul(isa: Isa, a: &[f32], m: usize, b: &Packed) -> Vec<f32> {
    product(&[(&Rounded::new(isa, a, m, b.k), b)])
}

/// The left-hand side `a` of `a · b`, `[m, k]`, rounded to bf16 in tile order: rounded once,
/// it serves every product that reads it (`x·W` and `x·A` in an adapted projection).
pub struct Rounded {
    m: usize,
    k: usize,
    k_padded: usize,
    data: Lines,
}

impl std::fmt::Debug for Rounded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rounded [{}, {}] bf16", self.m, self.k)
    }
}

impl Rounded {
    pub fn new(isa: Isa, a: &[f32], m: usize, k: usize) -> Self {
        Self::reusing(isa, None, a, m, k)
    }

    /// [`Rounded::new`] in `old`'s memory where it is large enough: a buffer as wide as a
    /// vocabulary, fresh each time, spends longer faulting its pages in than rounding into them.
    pub fn reusing(isa: Isa, old: Option<Self>, a: &[f32], m: usize, k: usize) -> Self {
        assert_eq!(a.len(), m * k, "left operand is not [{m}, {k}]");
        let (m_padded, k_padded) = (padded(m), padded(k));
        let mut data = old.map_or(Lines(Vec::new()), |old| old.data);
        round_rows(isa, &mut data, a, m, k, m_padded, k_padded);
        Self {
            m,
            k,
            k_padded,
            data,
        }
    }

    /// `a` as the left-hand side of products and, from the same read of it, packed as the
    /// right-hand side of products over its rows, `c · a` for a `[r, m]` matrix `c` (what
    /// [`Packed::from_rows`] would make). An activation read twice from memory cost more
    /// than rounding it did.
    pub fn with_packed(isa: Isa, a: &[f32], m: usize, k: usize) -> (Self, Packed) {
        assert_eq!(a.len(), m * k, "matrix is not [{m}, {k}]");
        // The tile-order strips and the packed panels cover the same `m_padded × k_padded`.
        let k_padded = padded(k);
        let m_padded = padded(m);
        let (strip_len, panel_len, panels) =
            (ROWS * k_padded, m_padded / 2 * ROWS, k_padded / ROWS);
        let mut rows = None;
        let write = |words: &mut [MaybeUninit<u32>]| {
            let lines = SendPtr(words.as_mut_ptr().cast::<u32>());
            let round = |tiles: &mut [MaybeUninit<u16>]| {
                tiles
                    .par_chunks_mut(strip_len)
                    .enumerate()
                    .for_each(|(strip, tiles)| {
                        // This strip's rows are pairs `8·strip ..` of every panel.
                        let pairs = (0..panels).map(|panel| {
                            let at = panel * panel_len + strip * ROWS / 2 * ROWS;
                            // SAFETY: the line run is inside the buffer (`panels` panels of
                            // `panel_len` words), and no other strip's task touches it.
                            unsafe {
                                std::slice::from_raw_parts_mut(
                                    lines.get().add(at).cast::<MaybeUninit<u32>>(),
                                    ROWS / 2 * ROWS,
                                )
                            }
                        });
                        let pairs = pairs.collect();
                        isa.run(Strip {
                            a,
                            m,
                            k,
                            strip,
                            tiles,
                            pairs,
                        })
                    })
            };
            // SAFETY: the strips cover the buffer and `Strip` writes every element.
            rows = Some(unsafe { Lines::written(m_padded * k_padded, round) });
        };
        // SAFETY: the strips cover every panel, and `Strip` writes every word of theirs.
        let packed = unsafe { Lines::written(panels * panel_len, write) };
        let rows = rows.expect("rounded with the packing");
        let rounded = Self {
            m,
            k,
            k_padded,
            data: rows,
        };
        let packed = Packed {
            k: m,
            n: k,
            k_padded: m_padded,
            n_padded: k_padded,
            data: packed,
        };
        (rounded, packed)
    }
}

/// `Σ aᵢ · bᵢ` over terms that share `m` and `n`: one product over the concatenated inner
/// dimension `[a₁ | a₂ | …] · [b₁; b₂; …]`, summed in the tiles, so a rank-r update costs an
/// extra step of the inner loop instead of a pass over the output.
pub fn product(terms: &[(&Rounded, &Packed)]) -> Vec<f32> {
    let (m, n) = shape(terms);
    // Not zeroed: `fill` writes every element, and zeroing first was a pass over the output
    // for nothing.
    let mut out = Vec::<f32>::with_capacity(m * n);
    // SAFETY: the buffer holds `m × n` elements.
    unsafe {
        fill(terms, SendPtr(out.as_mut_ptr()));
        out.set_len(m * n);
    }
    out
}

/// [`product`] into `out`, a row-major `[m, n]` buffer (one reused across calls has its pages
/// in place; a fresh `Vec` as wide as a vocabulary faults every one of them in).
pub fn product_into(terms: &[(&Rounded, &Packed)], out: &mut [f32]) {
    let (m, n) = shape(terms);
    assert_eq!(out.len(), m * n, "output is not [{m}, {n}]");
    // SAFETY: the buffer holds `m × n` elements.
    unsafe { fill(terms, SendPtr(out.as_mut_ptr())) };
}

/// `(m, n)` of a sum of products, checking that the terms agree.
fn shape(terms: &[(&Rounded, &Packed)]) -> (usize, usize) {
    assert!(available(), "AMX bf16 is not available on this CPU");
    let (first, rest) = terms.split_first().expect("a product of at least one term");
    let (m, n) = (first.0.m, first.1.n);
    for (a, b) in terms {
        assert_eq!(
            a.k, b.k,
            "inner dimensions differ: [{}, {}] · [{}, {}]",
            a.m, a.k, b.k, b.n
        );
    }
    for (a, b) in rest {
        assert_eq!((a.m, b.n), (m, n), "terms of different shapes");
    }
    (m, n)
}

/// Writes every element of the `[m, n]` product into `out`.
///
/// # Safety
/// `out` must point at `m × n` writable elements; the terms must agree (`shape`).
unsafe fn fill(terms: &[(&Rounded, &Packed)], out: SendPtr) {
    let (m, n_padded) = (terms[0].0.m, terms[0].1.n_padded);
    let n = terms[0].1.n;
    if m == 0 || n == 0 {
        return;
    }
    let (row_blocks, col_blocks) = (padded(m) / BLOCK, n_padded / BLOCK);
    // Long products (one term, `k` over two pieces) go piece by piece, several column blocks
    // a task; the rest keep one column block a task and walk `k` whole, as before.
    let steps = terms[0].1.k_padded / K_STEP;
    let (piece, cols_per_task) = match terms.len() == 1 && steps > 2 * PIECE_STEPS {
        true => (PIECE_STEPS, LONG_COLS),
        false => (usize::MAX, 1),
    };
    let row_groups = row_blocks.div_ceil(BLOCKS_PER_TASK);
    let col_groups = col_blocks.div_ceil(cols_per_task);
    (0..col_groups * row_groups)
        .into_par_iter()
        .for_each(|index| {
            let (col_group, row_group) = (index / row_groups, index % row_groups);
            let span = |group: usize, per: usize, total: usize| {
                group * per..((group + 1) * per).min(total)
            };
            let task = Task {
                cols: span(col_group, cols_per_task, col_blocks),
                blocks: span(row_group, BLOCKS_PER_TASK, row_blocks),
                piece,
            };
            // SAFETY: `available()` holds; each task writes only its own rows × columns of
            // `out` (the column groups cover `n` and the row groups `m`), which outlives the
            // parallel loop; every term is padded to whole blocks.
            unsafe { kernel(terms, m, n, task, out) };
        });
}

/// One task's share of a product: column blocks `cols` of row blocks `blocks`, `piece` tile
/// steps of `k` at a time.
struct Task {
    cols: std::ops::Range<usize>,
    blocks: std::ops::Range<usize>,
    piece: usize,
}

#[derive(Clone, Copy)]
struct SendPtr<T = f32>(*mut T);
// SAFETY: tasks write disjoint parts of the buffer behind the pointer.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as for `Send`: tasks share the pointer only to write parts no other task writes.
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer; a closure that calls this captures the whole `SendPtr`, not its field.
    fn get(self) -> *mut T {
        self.0
    }
}

/// `a` rounded to bf16 in tile order: each 16-row strip is its `k_padded / 32` tiles of
/// 16 × 32, one after another, so a tile load reads one contiguous KiB and a strip streams
/// through memory in order (a row-major `a` puts a tile's rows a whole row apart, and the
/// loads then wait on 16 scattered lines). Zeros in the padding, and nothing written twice:
/// zeroing the buffer first was a pass over it for nothing.
fn round_rows(
    isa: Isa,
    out: &mut Lines,
    a: &[f32],
    m: usize,
    k: usize,
    m_padded: usize,
    k_padded: usize,
) {
    let round = |tiles: &mut [MaybeUninit<u16>]| {
        tiles
            .par_chunks_mut(ROWS * k_padded)
            .enumerate()
            .for_each(|(strip, tiles)| {
                let pairs = Vec::new();
                isa.run(Strip {
                    a,
                    m,
                    k,
                    strip,
                    tiles,
                    pairs,
                })
            })
    };
    // SAFETY: the strips cover the buffer and `Strip` writes every element of each.
    unsafe { out.rewrite(m_padded * k_padded, round) }
}

/// One 16-row strip of a row-major `[m, k]` matrix `a` (rows past `m` are zeros): rounded into
/// its tiles and, for each panel in `pairs`, packed into that panel's 8 lines of row pairs.
struct Strip<'a> {
    a: &'a [f32],
    m: usize,
    k: usize,
    strip: usize,
    tiles: &'a mut [MaybeUninit<u16>],
    pairs: Vec<&'a mut [MaybeUninit<u32>]>,
}

impl Kernel for Strip<'_> {
    type Out = ();

    #[inline(always)]
    fn run<M: MulAdd>(self) {
        let Self {
            a,
            m,
            k,
            strip,
            tiles,
            pairs,
        } = self;
        let row = |r: usize| match r < m {
            true => &a[r * k..(r + 1) * k],
            false => &[][..],
        };
        for r in 0..ROWS {
            round_row(row(strip * ROWS + r), tiles, r);
        }
        for (panel, lines) in pairs.into_iter().enumerate() {
            let cols = (panel * ROWS).min(k)..((panel + 1) * ROWS).min(k);
            for (i, line) in lines.chunks_exact_mut(ROWS).enumerate() {
                let pair = strip * ROWS / 2 + i;
                let [even, odd] =
                    [row(2 * pair), row(2 * pair + 1)].map(|r| r.get(cols.clone()).unwrap_or(&[]));
                interleave(even, odd, line);
            }
        }
    }
}

/// Rounds one row (`k` values or none) into row `r` of its strip's tiles, zeros after it.
#[inline(always)]
fn round_row(src: &[f32], strip: &mut [MaybeUninit<u16>], r: usize) {
    let tiles = strip.len() / (ROWS * K_STEP);
    for step in 0..tiles {
        let at = step * ROWS * K_STEP + r * K_STEP;
        let dst = &mut strip[at..at + K_STEP];
        let src = src.get(step * K_STEP..).unwrap_or(&[]);
        if let Some(src) = src.first_chunk::<K_STEP>() {
            // Whole tile rows, the common case, at a fixed width so the loop vectorises.
            for (d, &s) in dst.iter_mut().zip(src) {
                d.write(bf16_rounded(s));
            }
            continue;
        }
        let src = &src[..src.len().min(K_STEP)];
        round(src, &mut dst[..src.len()]);
        dst[src.len()..].fill(MaybeUninit::new(0));
    }
}

/// The panels from `first` on that `out` holds (whole panels of `panel_len` words), packed
/// from the row-major `[k, n]` matrix `b` a row pair at a time, every word written.
struct PackPanels<'a> {
    b: &'a [f32],
    k: usize,
    n: usize,
    first: usize,
    out: &'a mut [MaybeUninit<u32>],
    panel_len: usize,
}

impl Kernel for PackPanels<'_> {
    type Out = ();

    #[inline(always)]
    fn run<M: MulAdd>(self) {
        let Self {
            b,
            k,
            n,
            first,
            out,
            panel_len,
        } = self;
        pack_panels(b, k, n, first, out, panel_len)
    }
}

#[inline(always)]
fn pack_panels(
    b: &[f32],
    k: usize,
    n: usize,
    first: usize,
    out: &mut [MaybeUninit<u32>],
    panel_len: usize,
) {
    let panels = out.len() / panel_len;
    let cols = first * ROWS..((first + panels) * ROWS).min(n);
    let pairs = k.div_ceil(2);
    for pair in 0..pairs {
        let even = &b[2 * pair * n..(2 * pair + 1) * n][cols.clone()];
        let odd = match 2 * pair + 1 < k {
            true => &b[(2 * pair + 1) * n..(2 * pair + 2) * n][cols.clone()],
            false => &[][..],
        };
        for (panel, even) in even.chunks(ROWS).enumerate() {
            let at = panel * panel_len + pair * ROWS;
            let line = &mut out[at..at + ROWS];
            let odd = odd
                .get(panel * ROWS..(panel * ROWS + even.len()))
                .unwrap_or(&[]);
            interleave(even, odd, line);
        }
    }
    for panel in out.chunks_exact_mut(panel_len) {
        panel[pairs * ROWS..].fill(MaybeUninit::new(0));
    }
}

/// One line of a panel: word `j` holds `even[j]` in its low half and `odd[j]` in its high
/// half, rounded, and zeros past the rows' ends.
#[inline(always)]
fn interleave(even: &[f32], odd: &[f32], line: &mut [MaybeUninit<u32>]) {
    if let (Ok(even), Ok(odd)) = (
        <&[f32; ROWS]>::try_from(even),
        <&[f32; ROWS]>::try_from(odd),
    ) {
        // Whole lines, the common case, at a fixed width so the loop vectorises.
        for ((word, &e), &o) in line.iter_mut().zip(even).zip(odd) {
            word.write(bf16_rounded(e) as u32 | (bf16_rounded(o) as u32) << 16);
        }
        return;
    }
    for (j, word) in line.iter_mut().enumerate() {
        let half = |row: &[f32]| row.get(j).map_or(0, |&v| bf16_rounded(v) as u32);
        word.write(half(even) | half(odd) << 16);
    }
}

/// Round to nearest, ties to even (what `half` and PyTorch do), in integer arithmetic that
/// vectorises; NaN stays NaN.
#[inline(always)]
fn round(src: &[f32], dst: &mut [MaybeUninit<u16>]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(bf16_rounded(s));
    }
}

#[inline(always)]
fn bf16_rounded(s: f32) -> u16 {
    let bits = s.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    if s.is_nan() { 0x7fc0 } else { rounded as u16 }
}

/// The tile configuration: palette 1, tiles 0–3 accumulate a 2 × 2 block of 16 × 16 f32,
/// tiles 4–5 hold two 16-row strips of `a`, 6–7 two 16-column panels of `b`.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> Self {
        let mut bytes = [0u8; 64];
        bytes[0] = 1;
        for tile in 0..8 {
            bytes[16 + 2 * tile] = 64; // bytes per row (u16, little end)
            bytes[48 + tile] = ROWS as u8;
        }
        Self(bytes)
    }
}

/// Loads the tile configuration on this thread, once: `ldtilecfg` zeroes every tile and
/// waits for the tile unit to drain, and loading it per task was an eighth of the kernel's
/// time. The configuration then stays with the thread (the kernel saves it with the rest of
/// the tile state across context switches); nothing else in the process uses tiles.
///
/// # Safety
/// AMX must be available.
#[cfg(target_arch = "x86_64")]
unsafe fn configure_tiles() {
    thread_local! {
        static CONFIGURED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if !CONFIGURED.get() {
        let config = TileConfig::new();
        // SAFETY: the caller's promise that AMX is available; the configuration is valid.
        unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack)) };
        CONFIGURED.set(true);
    }
}

/// Computes `task`'s column blocks of `out` for its row blocks (32 rows and columns each),
/// summing the products of all `terms`. Each block's sums stay in the tiles while the task
/// walks a piece of `k`, and wait in `partial` between pieces.
///
/// # Safety
/// AMX must be available; each term's `Rounded` and `Packed` must come from their constructors
/// here, all of `m` rows and `n` columns; `out` must point at an `[m, n]`
/// buffer that no other thread writes in these rows and columns. A task of several pieces
/// has one term and at most `LONG_COLS × BLOCKS_PER_TASK` blocks.
#[cfg(target_arch = "x86_64")]
unsafe fn kernel(terms: &[(&Rounded, &Packed)], m: usize, n: usize, task: Task, out: SendPtr) {
    use std::arch::asm;
    type Tile = [f32; ROWS * ROWS];
    // Only edge tiles pass through here, and only what they wrote is read back.
    let mut spill = [MaybeUninit::<Tile>::uninit(); 4];
    // Four tiles per block of a task that goes piece by piece; read only after written.
    let mut partial = [MaybeUninit::<[Tile; 4]>::uninit(); LONG_COLS * BLOCKS_PER_TASK];
    let steps = terms[0].1.k_padded / K_STEP;
    let pieces = steps.div_ceil(task.piece).max(1);
    // SAFETY: the caller's promise: AMX is available and the operands are padded to whole
    // blocks, so every tile load below reads inside a strip or panel (blocks stay below the
    // padded `m` and `n`, pieces below the padded `k`); stores go through `store_block`, which
    // writes only this task's rows and columns of `out`, and `partial` is read only where an
    // earlier piece wrote it.
    unsafe {
        configure_tiles();
        for piece in 0..pieces {
            let (first, last) = (piece == 0, piece + 1 == pieces);
            let at = piece.saturating_mul(task.piece);
            for (c, col_block) in task.cols.clone().enumerate() {
                for (r, block) in task.blocks.clone().enumerate() {
                    let saved = partial[c * BLOCKS_PER_TASK + r].as_mut_ptr().cast::<f32>();
                    if first {
                        asm!(
                            "tilezero tmm0",
                            "tilezero tmm1",
                            "tilezero tmm2",
                            "tilezero tmm3",
                            options(nostack)
                        );
                    } else {
                        asm!(
                            "tileloadd tmm0, [{p} + {s}*1]",
                            "tileloadd tmm1, [{p} + {s}*1 + 1024]",
                            "tileloadd tmm2, [{p} + {s}*1 + 2048]",
                            "tileloadd tmm3, [{p} + {s}*1 + 3072]",
                            p = in(reg) saved,
                            s = in(reg) ROWS * 4,
                            options(nostack)
                        );
                    }
                    for (a, b) in terms {
                        // A panel of `b` and a strip of `a` are both 16 × `k_padded` bf16.
                        let panel_len = b.k_padded * ROWS;
                        let panel0 = b.data.as_ptr::<u16>().add(col_block * 2 * panel_len);
                        let panel1 = panel0.add(panel_len);
                        let strip0 = a.data.as_ptr::<u16>().add(block * BLOCK * a.k_padded);
                        let strip1 = strip0.add(panel_len);
                        let own = b.k_padded / K_STEP;
                        // Each product right after the loads it needs, so the tile unit
                        // starts on the first pair while the others load.
                        for step in at.min(own)..at.saturating_add(task.piece).min(own) {
                            asm!(
                                "tileloadd tmm4, [{a0} + {a_stride}*1]",
                                "tileloadd tmm6, [{b0} + {b_stride}*1]",
                                "tdpbf16ps tmm0, tmm4, tmm6",
                                "tileloadd tmm7, [{b1} + {b_stride}*1]",
                                "tdpbf16ps tmm1, tmm4, tmm7",
                                "tileloadd tmm5, [{a1} + {a_stride}*1]",
                                "tdpbf16ps tmm2, tmm5, tmm6",
                                "tdpbf16ps tmm3, tmm5, tmm7",
                                a0 = in(reg) strip0.add(step * K_STEP * ROWS),
                                a1 = in(reg) strip1.add(step * K_STEP * ROWS),
                                b0 = in(reg) panel0.add(step * K_STEP * ROWS),
                                b1 = in(reg) panel1.add(step * K_STEP * ROWS),
                                a_stride = in(reg) K_STEP * 2,
                                b_stride = in(reg) 2 * ROWS * 2,
                                options(nostack)
                            );
                        }
                    }
                    if !last {
                        asm!(
                            "tilestored [{p} + {s}*1], tmm0",
                            "tilestored [{p} + {s}*1 + 1024], tmm1",
                            "tilestored [{p} + {s}*1 + 2048], tmm2",
                            "tilestored [{p} + {s}*1 + 3072], tmm3",
                            p = in(reg) saved,
                            s = in(reg) ROWS * 4,
                            options(nostack)
                        );
                        continue;
                    }
                    store_block(&mut spill, m, n, block * BLOCK, col_block * BLOCK, out);
                }
            }
        }
    }
}

/// Stores the four tiles of the block at (`row0`, `col0`) into `out`: a tile that lies wholly
/// inside `out` directly, edge tiles through `spill`, copying only their valid part.
///
/// # Safety
/// AMX must be available and the tiles hold the block's sums; `out` as for [`kernel`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_block(
    spill: &mut [MaybeUninit<[f32; ROWS * ROWS]>; 4],
    m: usize,
    n: usize,
    row0: usize,
    col0: usize,
    out: SendPtr,
) {
    use std::arch::asm;
    let out_stride = n * 4;
    let tiles = [(0, 0), (0, ROWS), (ROWS, 0), (ROWS, ROWS)];
    for (tile, &(dr, dc)) in tiles.iter().enumerate() {
        let (r, c) = (row0 + dr, col0 + dc);
        let whole = r + ROWS <= m && c + ROWS <= n;
        // SAFETY: a whole tile lies inside `out`'s `[m, n]` (just checked) in rows and columns
        // the caller gave this task; an edge tile goes to its own `spill` tile and only its
        // part inside `[m, n]` is copied out.
        unsafe {
            let (dst, stride) = if whole {
                (out.0.add(r * n + c), out_stride)
            } else {
                (spill[tile].as_mut_ptr().cast::<f32>(), ROWS * 4)
            };
            match tile {
                0 => {
                    asm!("tilestored [{d} + {s}*1], tmm0", d = in(reg) dst, s = in(reg) stride, options(nostack))
                }
                1 => {
                    asm!("tilestored [{d} + {s}*1], tmm1", d = in(reg) dst, s = in(reg) stride, options(nostack))
                }
                2 => {
                    asm!("tilestored [{d} + {s}*1], tmm2", d = in(reg) dst, s = in(reg) stride, options(nostack))
                }
                _ => {
                    asm!("tilestored [{d} + {s}*1], tmm3", d = in(reg) dst, s = in(reg) stride, options(nostack))
                }
            }
            if !whole && r < m && c < n {
                let cols = (n - c).min(ROWS);
                for i in 0..(m - r).min(ROWS) {
                    std::ptr::copy_nonoverlapping(
                        spill[tile].as_ptr().cast::<f32>().add(i * ROWS),
                        out.0.add((r + i) * n + c),
                        cols,
                    );
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(_: &[(&Rounded, &Packed)], _: usize, _: usize, _: Task, _: SendPtr) {
    unreachable!("AMX exists on x86_64 only")
}

#[cfg(test)]
mod tests {
    //! The layouts the tiles read, decoded back to matrices: these run on every CPU, AMX or
    //! not, through every dispatch path it has. The products themselves are in
    //! `tests/kernels.rs`, where a CPU without AMX reports them as ignored.
    use super::*;

    fn bf16(x: f32) -> u16 {
        half::bf16::from_f32(x).to_bits()
    }

    fn matrix(rows: usize, cols: usize, seed: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    fn words<T: Word>(lines: &Lines) -> &[T] {
        let len = lines.0.len() * 64 / size_of::<T>();
        // SAFETY: every word of a `Lines` is initialised and any bit pattern is a valid word.
        unsafe { std::slice::from_raw_parts(lines.as_ptr::<T>(), len) }
    }

    /// `[k_padded, n_padded]` bf16 bits of a packed right-hand side, row-major.
    fn unpack(b: &Packed) -> Vec<u16> {
        let words = words::<u32>(&b.data);
        let panel_len = b.k_padded / 2 * ROWS;
        let mut out = vec![0u16; b.k_padded * b.n_padded];
        for p in 0..b.k_padded {
            for j in 0..b.n_padded {
                let word = words[j / ROWS * panel_len + p / 2 * ROWS + j % ROWS];
                out[p * b.n_padded + j] = (word >> (16 * (p % 2))) as u16;
            }
        }
        out
    }

    /// `[m_padded, k_padded]` bf16 bits of a rounded left-hand side, row-major.
    fn unround(a: &Rounded) -> Vec<u16> {
        let words = words::<u16>(&a.data);
        let m_padded = padded(a.m);
        let mut out = vec![0u16; m_padded * a.k_padded];
        for i in 0..m_padded {
            for p in 0..a.k_padded {
                let at = i / ROWS * ROWS * a.k_padded + p / K_STEP * ROWS * K_STEP;
                out[i * a.k_padded + p] = words[at + i % ROWS * K_STEP + p % K_STEP];
            }
        }
        out
    }

    /// `rows × cols` values in a zero-padded `[rows_padded, cols_padded]` as bf16 bits.
    fn expected(
        x: &[f32],
        rows: usize,
        cols: usize,
        padded_cols: usize,
        padded_rows: usize,
    ) -> Vec<u16> {
        let mut out = vec![0u16; padded_rows * padded_cols];
        for i in 0..rows {
            for j in 0..cols {
                out[i * padded_cols + j] = bf16(x[i * cols + j]);
            }
        }
        out
    }

    const SHAPES: [(usize, usize); 6] =
        [(1, 1), (37, 50), (64, 96), (70, 130), (5, 300), (300, 33)];

    #[test]
    fn packings_lay_out_the_rounded_matrix() {
        for isa in Isa::ALL.into_iter().filter(|isa| isa.is_available()) {
            for (k, n) in SHAPES {
                let b = matrix(k, n, 2);
                let want = expected(&b, k, n, padded(n), padded(k));
                let by_rows = Packed::from_rows(isa, &b, k, n);
                assert_eq!(unpack(&by_rows), want, "{isa:?} from_rows [{k}, {n}]");
                let mut bt = vec![0f32; k * n];
                for row in 0..k {
                    for col in 0..n {
                        bt[col * k + row] = b[row * n + col];
                    }
                }
                let by_transpose = Packed::from_transposed(&bt, k, n);
                assert_eq!(unpack(&by_transpose), want, "from_transposed [{k}, {n}]");
            }
        }
    }

    #[test]
    fn rounding_lays_out_tiles_and_packs_the_same_read() {
        for isa in Isa::ALL.into_iter().filter(|isa| isa.is_available()) {
            for (m, k) in SHAPES {
                let a = matrix(m, k, 3);
                let want = expected(&a, m, k, padded(k), padded(m));
                assert_eq!(
                    unround(&Rounded::new(isa, &a, m, k)),
                    want,
                    "{isa:?} [{m}, {k}]"
                );
                // A reused buffer, larger and full of other values, gives the same tiles.
                let old = Rounded::new(isa, &matrix(m + 40, k + 40, 9), m + 40, k + 40);
                let reused = Rounded::reusing(isa, Some(old), &a, m, k);
                assert_eq!(unround(&reused), want, "{isa:?} reusing [{m}, {k}]");
                let (rounded, packed) = Rounded::with_packed(isa, &a, m, k);
                assert_eq!(unround(&rounded), want, "{isa:?} with_packed [{m}, {k}]");
                let by_rows = Packed::from_rows(isa, &a, m, k);
                assert_eq!(
                    unpack(&packed),
                    unpack(&by_rows),
                    "{isa:?} packed [{m}, {k}]"
                );
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // Two exact ties (1 + 2⁻⁸ rounds down to even, 1 + 3·2⁻⁸ up), a plain value, specials.
        let src = [
            1.0f32,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -2.5e-3,
            f32::NAN,
            f32::INFINITY,
            3.4e38,
        ];
        let mut strip = [MaybeUninit::new(1u16); ROWS * K_STEP];
        round_row(&src, &mut strip, 0);
        // SAFETY: initialised above.
        let strip = strip.map(|d| unsafe { d.assume_init() });
        assert!(
            strip[src.len()..K_STEP].iter().all(|&d| d == 0),
            "zeros after the row"
        );
        for (s, &d) in src.iter().zip(&strip) {
            let want = half::bf16::from_f32(*s);
            if s.is_nan() {
                assert!(half::bf16::from_bits(d).is_nan());
            } else {
                assert_eq!(d, want.to_bits(), "{s}");
            }
        }
    }
}
