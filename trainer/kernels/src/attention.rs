//! Scaled dot-product attention for both families, on `f32` slices: each query visits only
//! the keys it may see, its own packed sequence up to itself in a causal LM or its row's real
//! tokens in an encoder, so no `[batch, heads, seq, seq]` score tensor, mask or softmax output
//! is ever built. It applies the rotary embedding itself, reads q, k and v in the projections'
//! `[batch, seq, heads·head_dim]` layout and writes its output in the same layout. The
//! backward recomputes each query's probabilities from its saved log-sum-exp (flash
//! attention's trick): it needs q, k, v, the output and one float per query and head.

use rayon::prelude::*;

use crate::dispatch::{Isa, Kernel, MulAdd};
use crate::vector::{LANES, block, dot, exp, max, sum};

/// Everything attention needs besides q, k and v, for one batch; built once and shared by
/// every layer.
#[derive(Debug)]
pub struct Plan {
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Per token: the keys its query attends to, `[lo, hi)` within its row.
    keys: Vec<(u32, u32)>,
    /// Per token, HF's rotary tables, `head_dim` each: `x·cos + rotate_half(x)·sin`, with
    /// `rotate_half`'s sign folded into the first half of the sines.
    rope: Option<(Vec<f32>, Vec<f32>)>,
    scale: f32,
}

impl Plan {
    /// `keys[token]` is the range of its row's keys that token's query attends to; a query
    /// must see at least one key. `rope` is `(theta, positions)`: the rotary base and each
    /// token's position in its sequence.
    pub fn new(
        [batch, seq]: [usize; 2],
        [heads, kv_heads, head_dim]: [usize; 3],
        keys: Vec<(u32, u32)>,
        rope: Option<(f64, &[u32])>,
    ) -> Self {
        assert_eq!(keys.len(), batch * seq, "one key range per token");
        assert!(
            keys.iter().all(|&(lo, hi)| lo < hi && hi as usize <= seq),
            "every query sees a key of its row"
        );
        assert!(heads.is_multiple_of(kv_heads) && head_dim.is_multiple_of(2));
        let rope = rope.map(|(theta, positions)| {
            assert_eq!(positions.len(), batch * seq, "one position per token");
            rope_tables(theta, positions, head_dim)
        });
        Self {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim,
            keys,
            rope,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }

    /// `[batch, seq]`.
    pub fn batch_seq(&self) -> [usize; 2] {
        [self.batch, self.seq]
    }

    /// `[heads, kv_heads, head_dim]`.
    pub fn heads(&self) -> [usize; 3] {
        [self.heads, self.kv_heads, self.head_dim]
    }

    /// Per token, the keys `[lo, hi)` of its row its query attends to.
    pub fn keys(&self) -> &[(u32, u32)] {
        &self.keys
    }

    /// Per token, the rotary tables `(cos, sin)`, `head_dim` each, with `rotate_half`'s sign
    /// folded into the first half of the sines.
    pub fn rope(&self) -> Option<(&[f32], &[f32])> {
        self.rope
            .as_ref()
            .map(|(c, s)| (c.as_slice(), s.as_slice()))
    }

    /// `1/√head_dim`.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// `(output, log-sum-exp of each query's scores)`, the latter `[batch, heads, seq]`.
    ///
    /// # Shapes
    /// - q, output: `[batch, seq, heads · head_dim]`
    /// - k, v: `[batch, seq, kv_heads · head_dim]`
    pub fn forward(&self, isa: Isa, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let parts: Vec<(Vec<f32>, Vec<f32>)> = self
            .tasks()
            .map(|(b, g)| {
                let task = ForwardTask {
                    plan: self,
                    inputs: [q, k, v],
                    b,
                    g,
                };
                isa.run(task)
            })
            .collect();
        let out = self.merge_heads(self.heads, |b, g| &parts[b * self.kv_heads + g].0);
        // Task (b, g) holds heads g·group .. (g+1)·group of batch row b: in order already.
        let lse = parts.into_iter().flat_map(|(_, lse)| lse).collect();
        (out, lse)
    }

    /// `(∂q, ∂k, ∂v)`, in their inputs' layouts, for the upstream gradient `grad` of what
    /// [`Plan::forward`] returned.
    pub fn backward(
        &self,
        isa: Isa,
        inputs: [&[f32]; 3],
        out: &[f32],
        lse: &[f32],
        grad: &[f32],
    ) -> [Vec<f32>; 3] {
        let parts: Vec<[Vec<f32>; 3]> = self
            .tasks()
            .map(|(b, g)| {
                let task = BackwardTask {
                    plan: self,
                    inputs,
                    out,
                    lse,
                    grad,
                    b,
                    g,
                };
                isa.run(task)
            })
            .collect();
        let part = |b: usize, g: usize, n: usize| parts[b * self.kv_heads + g][n].as_slice();
        [
            self.merge_heads(self.heads, |b, g| part(b, g, 0)),
            self.merge_heads(self.kv_heads, |b, g| part(b, g, 1)),
            self.merge_heads(self.kv_heads, |b, g| part(b, g, 2)),
        ]
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// One task per batch row and key/value head: it owns that head's keys and values, and the
    /// gradients flowing into them, outright.
    fn tasks(&self) -> impl IndexedParallelIterator<Item = (usize, usize)> + '_ {
        (0..self.batch * self.kv_heads)
            .into_par_iter()
            .map(|t| (t / self.kv_heads, t % self.kv_heads))
    }

    /// The `[batch, seq, heads_total · head_dim]` tensor whose head block `g` of row `b` is
    /// `part(b, g)`, `[heads_total / kv_heads, seq, head_dim]`.
    fn merge_heads<'a>(
        &self,
        heads_total: usize,
        part: impl Fn(usize, usize) -> &'a [f32] + Sync,
    ) -> Vec<f32> {
        let (s, d) = (self.seq, self.head_dim);
        let per = heads_total / self.kv_heads;
        let mut out = vec![0f32; self.batch * s * heads_total * d];
        out.par_chunks_mut(heads_total * d)
            .enumerate()
            .for_each(|(token, row)| {
                let (b, i) = (token / s, token % s);
                for (g, row) in row.chunks_mut(per * d).enumerate() {
                    let part = part(b, g);
                    for (t, row) in row.chunks_mut(d).enumerate() {
                        row.copy_from_slice(&part[(t * s + i) * d..][..d]);
                    }
                }
            });
        out
    }

    /// The padded sizes the kernels work in.
    fn geometry(&self) -> Geometry {
        let (s, d) = (self.seq, self.head_dim);
        Geometry {
            s,
            d,
            dp: d.next_multiple_of(LANES),
            sp: s.next_multiple_of(LANES) + 2 * LANES,
        }
    }

    /// Key/value head `g` of batch row `b`, rotated when `rotate`: `[seq, dp]` rows.
    #[inline(always)]
    fn head_rows(&self, x: &[f32], b: usize, g: usize, rotate: bool) -> Vec<f32> {
        let Geometry { s, d, dp, .. } = self.geometry();
        let mut rows = vec![0f32; s * dp];
        for (j, row) in rows.chunks_exact_mut(dp).enumerate() {
            let token = b * s + j;
            let src = &x[(token * self.kv_heads + g) * d..][..d];
            match rotate {
                true => self.turn(token, src, false, 1.0, &mut row[..d]),
                false => row[..d].copy_from_slice(src),
            }
        }
        rows
    }

    /// `[dp, sp]` columns of `[seq, dp]` rows.
    #[inline(always)]
    fn columns(&self, rows: &[f32]) -> Vec<f32> {
        let Geometry { dp, sp, .. } = self.geometry();
        let mut cols = vec![0f32; dp * sp];
        for (j, row) in rows.chunks_exact(dp).enumerate() {
            for (t, &x) in row.iter().enumerate() {
                cols[t * sp + j] = x;
            }
        }
        cols
    }

    /// Query row `i` of head `h` in batch row `b`, rotated and scaled by `1/√d`.
    #[inline(always)]
    fn query(&self, q: &[f32], [b, h, i]: [usize; 3], out: &mut [f32]) {
        let d = self.head_dim;
        let token = b * self.seq + i;
        let src = &q[(token * self.heads + h) * d..][..d];
        self.turn(token, src, false, self.scale, &mut out[..d]);
    }

    /// `scale ·` token `token`'s head vector `x` rotated by its position (or, `transposed`,
    /// rotated back: the backward's turn), into `out`; only scaled without rotary tables.
    #[inline(always)]
    fn turn(&self, token: usize, x: &[f32], transposed: bool, scale: f32, out: &mut [f32]) {
        let d = self.head_dim;
        match &self.rope {
            Some((cos, sin)) => rotate(
                x,
                &cos[token * d..][..d],
                &sin[token * d..][..d],
                transposed,
                scale,
                out,
            ),
            None => out.iter_mut().zip(x).for_each(|(o, &x)| *o = x * scale),
        }
    }

    /// The query rows `i0 .. i0 + ROWS` (those that exist) of batch row `b`.
    #[inline(always)]
    fn tile(&self, b: usize, i0: usize) -> Tile {
        let n = ROWS.min(self.seq - i0);
        let key = |r: usize| {
            let (lo, hi) = self.keys[b * self.seq + i0 + r];
            (lo as usize, hi as usize)
        };
        let lo = (0..n).map(|r| key(r).0).min().expect("a row");
        let hi = (0..n).map(|r| key(r).1).max().expect("a row");
        Tile {
            n,
            keys: std::array::from_fn(|r| if r < n { key(r) } else { (lo, lo) }),
            lo,
            hi,
        }
    }
}

/// Query rows per tile: each key or value block loaded serves this many rows. [`scatter`]
/// spells out four.
const ROWS: usize = 4;
/// A task's sizes: `s` keys, head width `d`; rows of a head vector are padded to `dp`, a whole
/// number of vectors, and the transposed (column) layout has a key stride `sp` with room for
/// two vectors past the last key, so no block has a ragged edge.
#[derive(Clone, Copy)]
struct Geometry {
    s: usize,
    d: usize,
    dp: usize,
    sp: usize,
}

/// Up to `ROWS` consecutive query rows of one head: each one's keys, and their union.
struct Tile {
    /// Rows that exist (fewer than `ROWS` at the end of a sequence); the rest see no keys.
    n: usize,
    keys: [(usize, usize); ROWS],
    lo: usize,
    hi: usize,
}

impl Tile {
    /// The keys `lo..hi` widened to whole vectors, which [`scores`] has filled: the row-wise
    /// softmax works on these, with the keys a row must not see at −∞, so it needs no scalar
    /// loop at either end.
    fn span(&self) -> (usize, usize) {
        (self.lo - self.lo % LANES, self.hi.next_multiple_of(LANES))
    }
}

/// The forward of batch row `b`'s query heads that share key/value head `g`.
struct ForwardTask<'a> {
    plan: &'a Plan,
    inputs: [&'a [f32]; 3],
    b: usize,
    g: usize,
}

impl Kernel for ForwardTask<'_> {
    /// `[group, seq, head_dim]` outputs and `[group, seq]` log-sum-exps.
    type Out = (Vec<f32>, Vec<f32>);

    #[inline(always)]
    fn run<M: MulAdd>(self) -> Self::Out {
        let Self {
            plan,
            inputs: [q, k, v],
            b,
            g,
        } = self;
        let Geometry { s, d, dp, sp } = plan.geometry();
        let group = plan.group();
        let kt = plan.columns(&plan.head_rows(k, b, g, true));
        let vs = plan.head_rows(v, b, g, false);
        let mut out = vec![0f32; group * s * d];
        let mut lse = vec![0f32; group * s];
        let mut x = vec![0f32; ROWS * dp];
        let mut p = vec![0f32; ROWS * sp];
        let mut o = vec![0f32; ROWS * dp];
        for t in 0..group {
            let h = g * group + t;
            for i0 in (0..s).step_by(ROWS) {
                let tile = plan.tile(b, i0);
                for (r, x) in x.chunks_exact_mut(dp).enumerate() {
                    match r < tile.n {
                        true => plan.query(q, [b, h, i0 + r], x),
                        false => x.fill(0.0),
                    }
                }
                scores::<M>(&x, dp, d, &kt, sp, &tile, &mut p);
                let mut sums = [0f32; ROWS];
                let (a, z) = tile.span();
                for (r, p) in p.chunks_exact_mut(sp).enumerate() {
                    let p = &mut p[a..z];
                    let (lo, hi) = tile.keys[r];
                    if lo == hi {
                        p.fill(0.0);
                        continue;
                    }
                    p[..lo - a].fill(f32::NEG_INFINITY);
                    p[hi - a..].fill(f32::NEG_INFINITY);
                    let max = max(p);
                    p.iter_mut().for_each(|x| *x = exp(*x - max));
                    sums[r] = sum(p);
                    lse[t * s + i0 + r] = max + sums[r].ln();
                }
                accumulate::<M>(&p, sp, &tile, &vs, dp, &mut o);
                for r in 0..tile.n {
                    let row = &mut out[(t * s + i0 + r) * d..][..d];
                    for (out, &o) in row.iter_mut().zip(&o[r * dp..][..d]) {
                        *out = o / sums[r];
                    }
                }
            }
        }
        (out, lse)
    }
}

/// The backward of what [`ForwardTask`] computed. With `P` the probabilities recomputed from
/// the saved log-sum-exp and `∂O` the upstream gradient: `∂V = Pᵀ∂O`,
/// `∂S = P∘(∂O·Vᵀ − rowsum(∂O∘O))`, `∂Q = ∂S·K/√d`, `∂K = ∂Sᵀ·Q/√d`, each then rotated back
/// (the rotation's transpose) where the forward rotated.
struct BackwardTask<'a> {
    plan: &'a Plan,
    inputs: [&'a [f32]; 3],
    out: &'a [f32],
    lse: &'a [f32],
    grad: &'a [f32],
    b: usize,
    g: usize,
}

impl Kernel for BackwardTask<'_> {
    /// `∂q` `[group, seq, head_dim]`, `∂k` and `∂v` `[seq, head_dim]`.
    type Out = [Vec<f32>; 3];

    #[inline(always)]
    fn run<M: MulAdd>(self) -> Self::Out {
        let Self {
            plan,
            inputs: [q, k, v],
            out,
            lse,
            grad,
            b,
            g,
        } = self;
        let Geometry { s, d, dp, sp } = plan.geometry();
        let group = plan.group();
        let ks = plan.head_rows(k, b, g, true);
        let kt = plan.columns(&ks);
        let vt = plan.columns(&plan.head_rows(v, b, g, false));
        let mut dq = vec![0f32; group * s * d];
        let mut dk = vec![0f32; s * dp];
        let mut dv = vec![0f32; s * dp];
        let (mut x, mut go, mut dx) = (
            vec![0f32; ROWS * dp],
            vec![0f32; ROWS * dp],
            vec![0f32; ROWS * dp],
        );
        let (mut p, mut ds) = (vec![0f32; ROWS * sp], vec![0f32; ROWS * sp]);
        for t in 0..group {
            let h = g * group + t;
            for i0 in (0..s).step_by(ROWS) {
                let tile = plan.tile(b, i0);
                let mut delta = [0f32; ROWS];
                for (r, (x, go)) in x
                    .chunks_exact_mut(dp)
                    .zip(go.chunks_exact_mut(dp))
                    .enumerate()
                {
                    if r < tile.n {
                        plan.query(q, [b, h, i0 + r], x);
                        let at = ((b * s + i0 + r) * plan.heads + h) * d;
                        go[..d].copy_from_slice(&grad[at..][..d]);
                        delta[r] = dot(&go[..d], &out[at..][..d]);
                    } else {
                        x.fill(0.0);
                        go.fill(0.0);
                    }
                }
                scores::<M>(&x, dp, d, &kt, sp, &tile, &mut p);
                scores::<M>(&go, dp, d, &vt, sp, &tile, &mut ds);
                let (a, z) = tile.span();
                for (r, (p, ds)) in p
                    .chunks_exact_mut(sp)
                    .zip(ds.chunks_exact_mut(sp))
                    .enumerate()
                {
                    let (p, ds) = (&mut p[a..z], &mut ds[a..z]);
                    let (lo, hi) = tile.keys[r];
                    if lo == hi {
                        p.fill(0.0);
                        ds.fill(0.0);
                        continue;
                    }
                    p[..lo - a].fill(f32::NEG_INFINITY);
                    p[hi - a..].fill(f32::NEG_INFINITY);
                    let lse = lse[(b * plan.heads + h) * s + i0 + r];
                    for (p, ds) in p.iter_mut().zip(ds.iter_mut()) {
                        *p = exp(*p - lse);
                        *ds = *p * (*ds - delta[r]);
                    }
                }
                accumulate::<M>(&ds, sp, &tile, &ks, dp, &mut dx);
                scatter::<M>(&ds, sp, &tile, &x, dp, &mut dk);
                scatter::<M>(&p, sp, &tile, &go, dp, &mut dv);
                for r in 0..tile.n {
                    let token = b * s + i0 + r;
                    let (from, to) = (&dx[r * dp..][..d], &mut dq[(t * s + i0 + r) * d..][..d]);
                    plan.turn(token, from, true, plan.scale, to);
                }
            }
        }
        let unpad = |rows: &[f32], rotate: bool| {
            let mut out = vec![0f32; s * d];
            for (j, (from, to)) in rows
                .chunks_exact(dp)
                .zip(out.chunks_exact_mut(d))
                .enumerate()
            {
                match rotate {
                    true => plan.turn(b * s + j, &from[..d], true, 1.0, to),
                    false => to.copy_from_slice(&from[..d]),
                }
            }
            out
        };
        [dq, unpad(&dk, true), unpad(&dv, false)]
    }
}

/// `p[r·sp + j] = x[r] · cols[:, j]` for the `ROWS` rows of `x` (stride `dp`, `d` used) and the
/// tile's keys, in whole blocks: keys up to a block past the last get scores too, which
/// callers ignore.
#[inline(always)]
fn scores<M: MulAdd>(
    x: &[f32],
    dp: usize,
    d: usize,
    cols: &[f32],
    sp: usize,
    tile: &Tile,
    p: &mut [f32],
) {
    let mut j = tile.lo - tile.lo % LANES;
    while j < tile.hi {
        j += match tile.hi - j > LANES {
            true => score_block::<M, 2>(x, dp, d, cols, sp, j, p),
            false => score_block::<M, 1>(x, dp, d, cols, sp, j, p),
        };
    }
}

/// [`scores`] for the `V·LANES` keys from `j`: one column block loaded serves every row, and
/// the `ROWS·V` accumulators stay in registers. Returns the keys done.
#[inline(always)]
fn score_block<M: MulAdd, const V: usize>(
    x: &[f32],
    dp: usize,
    d: usize,
    cols: &[f32],
    sp: usize,
    j: usize,
    p: &mut [f32],
) -> usize {
    let acc = rank_one_tile::<M, V>(
        0..d,
        |t, r| x[r * dp + t],
        |t, v| block(&cols[t * sp + j + v * LANES..]),
    );
    store(&acc, p, sp, j);
    V * LANES
}

/// `Σ_step a(step, r) · b(step, v)` for `ROWS` rows and `V` vectors: the register tile that
/// both the score and the output products are made of. One `b` block loaded serves every row,
/// and the `ROWS·V` sums stay in registers.
#[inline(always)]
fn rank_one_tile<M: MulAdd, const V: usize>(
    steps: std::ops::Range<usize>,
    a: impl Fn(usize, usize) -> f32,
    b: impl Fn(usize, usize) -> [f32; LANES],
) -> [[[f32; LANES]; V]; ROWS] {
    let mut acc = [[[0f32; LANES]; V]; ROWS];
    for step in steps {
        let b: [[f32; LANES]; V] = std::array::from_fn(|v| b(step, v));
        for (r, acc) in acc.iter_mut().enumerate() {
            let ar = a(step, r);
            for (acc, b) in acc.iter_mut().zip(&b) {
                for k in 0..LANES {
                    acc[k] = M::mul_add(ar, b[k], acc[k]);
                }
            }
        }
    }
    acc
}

/// A tile's rows into `out` at `at`, `stride` apart.
#[inline(always)]
fn store<const V: usize>(
    acc: &[[[f32; LANES]; V]; ROWS],
    out: &mut [f32],
    stride: usize,
    at: usize,
) {
    for (r, acc) in acc.iter().enumerate() {
        for (v, acc) in acc.iter().enumerate() {
            out[r * stride + at + v * LANES..][..LANES].copy_from_slice(acc);
        }
    }
}

/// Splits a padded head vector into chunks of two vectors, the last of one where `dp` is odd
/// in vectors, and runs `f::<V>(start)` on each: the kernels' register tiles.
macro_rules! by_chunks {
    ($dp:expr, $f:ident::<$m:ty> ( $($arg:expr),* )) => {{
        let mut c = 0;
        while c < $dp {
            c += match $dp - c >= 2 * LANES {
                true => $f::<$m, 2>($($arg,)* c),
                false => $f::<$m, 1>($($arg,)* c),
            };
        }
    }};
}

/// `o[r] = Σⱼ w[r·sp + j] · rows[j]` over the tile's keys, for the `ROWS` rows (`o` stride `dp`).
#[inline(always)]
fn accumulate<M: MulAdd>(
    w: &[f32],
    sp: usize,
    tile: &Tile,
    rows: &[f32],
    dp: usize,
    o: &mut [f32],
) {
    by_chunks!(dp, accumulate_chunk::<M>(w, sp, tile, rows, dp, o));
}

#[inline(always)]
fn accumulate_chunk<M: MulAdd, const V: usize>(
    w: &[f32],
    sp: usize,
    tile: &Tile,
    rows: &[f32],
    dp: usize,
    o: &mut [f32],
    c: usize,
) -> usize {
    let acc = rank_one_tile::<M, V>(
        tile.lo..tile.hi,
        |j, r| w[r * sp + j],
        |j, v| block(&rows[j * dp + c + v * LANES..]),
    );
    store(&acc, o, dp, c);
    V * LANES
}

/// `rows[j] += Σᵣ w[r·sp + j] · x[r]` over the tile's keys.
#[inline(always)]
fn scatter<M: MulAdd>(w: &[f32], sp: usize, tile: &Tile, x: &[f32], dp: usize, rows: &mut [f32]) {
    by_chunks!(dp, scatter_chunk::<M>(w, sp, tile, x, dp, rows));
}

#[inline(always)]
fn scatter_chunk<M: MulAdd, const V: usize>(
    w: &[f32],
    sp: usize,
    tile: &Tile,
    x: &[f32],
    dp: usize,
    rows: &mut [f32],
    c: usize,
) -> usize {
    let xs: [[[f32; LANES]; ROWS]; V] =
        std::array::from_fn(|v| std::array::from_fn(|r| block(&x[r * dp + c + v * LANES..])));
    for j in tile.lo..tile.hi {
        let w: [f32; ROWS] = std::array::from_fn(|r| w[r * sp + j]);
        for (v, [x0, x1, x2, x3]) in xs.iter().enumerate() {
            let at = j * dp + c + v * LANES;
            let mut y = block(&rows[at..]);
            for k in 0..LANES {
                // Pairwise, so the four rows' terms are two short chains, not one long one.
                let a = M::mul_add(w[1], x1[k], w[0] * x0[k]);
                let b = M::mul_add(w[3], x3[k], w[2] * x2[k]);
                y[k] += a + b;
            }
            rows[at..][..LANES].copy_from_slice(&y);
        }
    }
    V * LANES
}

/// HF's rotary embedding, `out = scale · (x·cos + rotate_half(x)·sin)`, where `rotate_half`
/// swaps the halves (its sign is in `sin`); `transposed`, its transpose (swapping halves is its
/// own inverse, so only which half's sines apply changes).
///
/// `out[j] = scale · (x[j]·cos[j] + x[j']·sin[i])`, `j'` the index `j` in the other half, and
/// `i` that too when `transposed`, else `j`.
#[inline(always)]
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], transposed: bool, scale: f32, out: &mut [f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (o1, o2) = out.split_at_mut(half);
    let (s1, s2) = sin.split_at(half);
    let (s1, s2) = if transposed { (s2, s1) } else { (s1, s2) };
    let halves = [
        (x1, x2, o1, &cos[..half], s1),
        (x2, x1, o2, &cos[half..], s2),
    ];
    for (x, other, out, cos, sin) in halves {
        let mut j = 0;
        while j + LANES <= half {
            let (a, b) = (block(&x[j..]), block(&other[j..]));
            let (c, s) = (block(&cos[j..]), block(&sin[j..]));
            let mut o = [0f32; LANES];
            for k in 0..LANES {
                o[k] = scale * (a[k] * c[k] + b[k] * s[k]);
            }
            out[j..][..LANES].copy_from_slice(&o);
            j += LANES;
        }
        for j in j..half {
            out[j] = scale * (x[j] * cos[j] + other[j] * sin[j]);
        }
    }
}

/// Per token, its position's rotary tables. Each position's row is computed once (`half`
/// sines and cosines in f64, as transformers computes them in f32 from f64 frequencies) and
/// copied to every token at that position: packed rows repeat positions many times over.
pub fn rope_tables(theta: f64, positions: &[u32], d: usize) -> (Vec<f32>, Vec<f32>) {
    let half = d / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|j| 1.0 / theta.powf((2 * j) as f64 / d as f64))
        .collect();
    let longest = positions.iter().max().map_or(0, |&p| p as usize + 1);
    let mut by_position = vec![(0f32, 0f32); longest * half];
    for (pos, row) in by_position.chunks_exact_mut(half).enumerate() {
        for (j, entry) in row.iter_mut().enumerate() {
            let (s, c) = (pos as f64 * inv_freq[j]).sin_cos();
            *entry = (c as f32, s as f32);
        }
    }
    let mut cos = Vec::with_capacity(positions.len() * d);
    let mut sin = Vec::with_capacity(positions.len() * d);
    for &pos in positions {
        let row = &by_position[pos as usize * half..][..half];
        for negate in [true, false] {
            for &(c, s) in row {
                cos.push(c);
                sin.push(if negate { -s } else { s });
            }
        }
    }
    (cos, sin)
}
