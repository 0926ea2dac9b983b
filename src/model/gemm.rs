//! Matrix multiply for the CPU: `C (+)= A B`, A and B with any strides
//! (so transposes are free), C row-major; f32 for training, f64 for the
//! gradient checks (same loops, portable kernel).
//!
//! dfdx multiplies through the `gemm` crate, which on stable Rust stops at
//! AVX2 (8 lanes). This is the BLIS structure with an AVX-512 micro-kernel
//! (16 lanes, a 12 x 32 tile of C in 24 registers): B is packed into
//! KC x NR panels and the kernel streams them; A is read where it lies
//! (row-major or transposed, 12 rows at a time) when the kernel can, and
//! otherwise (its last rows, strided views, other CPUs) packed into
//! MR x KC panels. On a
//! CPU without AVX-512F the same loops run a portable kernel (the compiler
//! vectorises it for the baseline target), so results never depend on
//! which path ran beyond rounding order.
//!
//! Large products split their columns over the rayon pool's threads (inside
//! a training worker's one-thread pool that is one thread); each thread
//! packs its own B panels, so nothing is shared but A.

use rayon::prelude::*;

/// An element type the GEMM multiplies: its micro-kernel.
pub trait Scalar:
    Copy
    + Send
    + Sync
    + Default
    + std::ops::Add<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::AddAssign
    + 'static
{
    /// The (mr x nr) block of C at the start of `c` (rows `ldc` apart)
    /// = (or += with `add`) sum over p of apack[p] (MR) outer bpack[p] (NR).
    fn kernel(
        kc: usize,
        ap: &[Self],
        bp: &[Self],
        c: &mut [Self],
        ldc: usize,
        size: (usize, usize),
        add: bool,
    ) {
        let mut tile = [Self::default(); MR * NR];
        kernel_portable(kc, ap, bp, &mut tile);
        write_tile(&tile, c, ldc, size, add);
    }
    /// As [`Scalar::kernel`] for a full MR-row block, but A read where it
    /// lies: element (i, p) at `a[i * rs + p * cs]`, with `rs == 1` or
    /// `cs == 1`. The same sums in the same order as from a packed panel, so
    /// the same bits. `false`: not done on this type or CPU; callers ask
    /// [`Scalar::reads_a_in_place`] first and pack A where it says no.
    #[allow(clippy::too_many_arguments)]
    fn kernel_in_place(
        kc: usize,
        a: &[Self],
        (rs, cs): (usize, usize),
        bp: &[Self],
        c: &mut [Self],
        ldc: usize,
        nr: usize,
        add: bool,
    ) -> bool {
        let _ = (kc, a, rs, cs, bp, c, ldc, nr, add);
        false
    }
    /// Whether [`Scalar::kernel_in_place`] runs on this CPU.
    fn reads_a_in_place() -> bool {
        false
    }
    /// This thread's two packing buffers for the type (see [`with_scratch`]).
    fn scratch() -> &'static std::thread::LocalKey<Scratch<Self>>;
    /// dot(row, cols[q]) for each q, summed as [`Scalar::dot4x4`] sums.
    fn dot1x4(row: &[Self], cols: [&[Self]; 4]) -> [Self; 4] {
        dot1x4_portable(row, cols)
    }
    /// dot(rows[r], cols[q]) for each r, q; all slices of one length.
    fn dot4x4(rows: [&[Self]; 4], cols: [&[Self]; 4]) -> [[Self; 4]; 4] {
        dot4x4_portable(rows, cols)
    }
}

/// `f` with this thread's two packing buffers (reused across calls, so a
/// product allocates and zero-fills nothing once they have grown).
fn with_scratch<E: Scalar, R>(f: impl FnOnce(&mut Vec<E>, &mut Vec<E>) -> R) -> R {
    E::scratch().with(|s| {
        let (a, b) = &mut *s.borrow_mut();
        f(a, b)
    })
}

fn dot1x4_portable<E: Scalar>(row: &[E], cols: [&[E]; 4]) -> [E; 4] {
    std::array::from_fn(|q| dot_portable(row, cols[q]))
}

fn dot4x4_portable<E: Scalar>(rows: [&[E]; 4], cols: [&[E]; 4]) -> [[E; 4]; 4] {
    std::array::from_fn(|r| dot1x4_portable(rows[r], cols))
}

pub type Scratch<E> = std::cell::RefCell<(Vec<E>, Vec<E>)>;

thread_local! {
    static SCRATCH_F32: Scratch<f32> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    static SCRATCH_F64: Scratch<f64> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

impl Scalar for f64 {
    fn scratch() -> &'static std::thread::LocalKey<Scratch<f64>> {
        &SCRATCH_F64
    }
}

/// Store a computed tile's (mr x nr) corner into C.
fn write_tile<E: Scalar>(
    tile: &[E; MR * NR],
    c: &mut [E],
    ldc: usize,
    (mr, nr): (usize, usize),
    add: bool,
) {
    for i in 0..mr {
        let out = &mut c[i * ldc..i * ldc + nr];
        let t = &tile[i * NR..i * NR + nr];
        if add {
            out.iter_mut().zip(t).for_each(|(o, v)| *o += *v);
        } else {
            out.copy_from_slice(t);
        }
    }
}

impl Scalar for f32 {
    fn scratch() -> &'static std::thread::LocalKey<Scratch<f32>> {
        &SCRATCH_F32
    }
    #[inline]
    fn kernel(
        kc: usize,
        ap: &[f32],
        bp: &[f32],
        c: &mut [f32],
        ldc: usize,
        size: (usize, usize),
        add: bool,
    ) {
        if has_avx512() {
            // A packed panel: element (i, p) at ap[p * MR + i].
            block_avx512(kc, ap, (1, MR), bp, c, ldc, size, add);
        } else {
            let mut tile = [0.0f32; MR * NR];
            kernel_portable(kc, ap, bp, &mut tile);
            write_tile(&tile, c, ldc, size, add);
        }
    }
    #[inline]
    fn kernel_in_place(
        kc: usize,
        a: &[f32],
        strides: (usize, usize),
        bp: &[f32],
        c: &mut [f32],
        ldc: usize,
        nr: usize,
        add: bool,
    ) -> bool {
        if !has_avx512() || (strides.0 != 1 && strides.1 != 1) {
            return false;
        }
        block_avx512(kc, a, strides, bp, c, ldc, (MR, nr), add);
        true
    }
    fn reads_a_in_place() -> bool {
        has_avx512()
    }
    #[inline]
    fn dot1x4(row: &[f32], cols: [&[f32]; 4]) -> [f32; 4] {
        if has_avx512() {
            // SAFETY: AVX-512F is present (checked at run time).
            unsafe { dot1x4_avx512(row, cols) }
        } else {
            dot1x4_portable(row, cols)
        }
    }
    #[inline]
    fn dot4x4(rows: [&[f32]; 4], cols: [&[f32]; 4]) -> [[f32; 4]; 4] {
        if has_avx512() {
            // SAFETY: AVX-512F is present (checked at run time).
            unsafe { dot4x4_avx512(rows, cols) }
        } else {
            dot4x4_portable(rows, cols)
        }
    }
}

pub const MR: usize = 12;
pub const NR: usize = 32;
const KC: usize = 256;
const MC: usize = 144;
const NC: usize = 512;

/// A matrix view: element (i, j) at `ptr[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct View<'a, E> {
    pub data: &'a [E],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, E: Copy> View<'a, E> {
    pub fn row_major(data: &'a [E], cols: usize) -> Self {
        View {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a row-major (rows x cols) matrix, as (cols x rows).
    pub fn transposed(data: &'a [E], cols: usize) -> Self {
        View {
            data,
            rs: 1,
            cs: cols,
        }
    }
    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> E {
        self.data[i * self.rs + j * self.cs]
    }
}

/// `c (m x n, row-major) = a (m x k) b (k x n)`, or `+=` with `accumulate`.
pub fn gemm<E: Scalar>(
    m: usize,
    n: usize,
    k: usize,
    a: View<E>,
    b: View<E>,
    c: &mut [E],
    accumulate: bool,
) {
    assert!(c.len() >= m * n, "C holds m x n");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(E::default());
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let flops = 2.0 * (m * n * k) as f64;
    if m <= FEW_ROWS && a.cs == 1 && b.rs == 1 {
        few_rows(m, n, k, a, b, c, accumulate, threads, flops);
        return;
    }
    // Below a few MFLOP a second thread costs more than it saves.
    let chunks = if threads > 1 && flops > 4e6 && n >= 2 * NR {
        threads.min(n / NR)
    } else {
        1
    };
    if chunks == 1 {
        columns(m, 0, n, n, k, a, b, c, accumulate);
        return;
    }
    // Column ranges, NR-aligned, one per thread; each writes its own
    // columns of every row of C.
    let per = n.div_ceil(chunks).div_ceil(NR) * NR;
    let c_addr = c.as_mut_ptr() as usize;
    (0..chunks).into_par_iter().for_each(|t| {
        let j0 = t * per;
        let j1 = ((t + 1) * per).min(n);
        if j0 < j1 {
            // SAFETY: threads write disjoint column ranges of C.
            let c = unsafe { std::slice::from_raw_parts_mut(c_addr as *mut E, m * n) };
            columns(m, j0, j1, n, k, a, b, c, accumulate);
        }
    });
}

/// Products with at most this many rows of A (a token per row when
/// generating) skip packing: each column of B is read once, in place, and
/// dotted with every row of A, instead of being copied into panels first.
const FEW_ROWS: usize = 16;

/// C = A B for few rows of A (rows contiguous) and B's columns contiguous
/// (B = W^T of a row-major weight W), threaded over columns when large.
#[allow(clippy::too_many_arguments)]
fn few_rows<E: Scalar>(
    m: usize,
    n: usize,
    k: usize,
    a: View<E>,
    b: View<E>,
    c: &mut [E],
    accumulate: bool,
    threads: usize,
    flops: f64,
) {
    let chunks = if threads > 1 && flops > 2e6 {
        threads.min(n)
    } else {
        1
    };
    let per = n.div_ceil(chunks);
    let c_addr = c.as_mut_ptr() as usize;
    let run = |t: usize| {
        let (j0, j1) = (t * per, ((t + 1) * per).min(n));
        // SAFETY: each chunk writes its own columns of C.
        let c = unsafe { std::slice::from_raw_parts_mut(c_addr as *mut E, m * n) };
        // 4 rows of A against 4 columns of B at a time: each load feeds
        // four products. Edge blocks repeat their last row or column and
        // drop the copies, so every element is computed the same way.
        for j in (j0..j1).step_by(4) {
            let cols: [&[E]; 4] = std::array::from_fn(|q| {
                let jj = (j + q).min(j1 - 1);
                &b.data[jj * b.cs..jj * b.cs + k]
            });
            let mut put = |i: usize, vals: &[E; 4]| {
                for (q, v) in vals.iter().enumerate().take(j1 - j) {
                    let slot = &mut c[i * n + j + q];
                    *slot = if accumulate { *slot + *v } else { *v };
                }
            };
            let row = |i: usize| &a.data[i * a.rs..i * a.rs + k];
            let full = m / 4 * 4;
            for i in (0..full).step_by(4) {
                let block = E::dot4x4(std::array::from_fn(|r| row(i + r)), cols);
                for (r, vals) in block.iter().enumerate() {
                    put(i + r, vals);
                }
            }
            // The last rows one at a time (the same sums, in the same order).
            for i in full..m {
                put(i, &E::dot1x4(row(i), cols));
            }
        }
    };
    if chunks == 1 {
        run(0);
    } else {
        (0..chunks).into_par_iter().for_each(run);
    }
}

/// C[:, j0..j1] of a row-major C with `ldc` columns.
#[allow(clippy::too_many_arguments)]
fn columns<E: Scalar>(
    m: usize,
    j0: usize,
    j1: usize,
    ldc: usize,
    k: usize,
    a: View<E>,
    b: View<E>,
    c: &mut [E],
    accumulate: bool,
) {
    with_scratch::<E, _>(|apack, bpack| {
        // Panels as large as this product needs (packing overwrites them).
        let kc_max = KC.min(k);
        let (bsize, asize) = (
            kc_max * NC.min(j1 - j0).div_ceil(NR) * NR,
            kc_max * MC.min(m).div_ceil(MR) * MR,
        );
        if bpack.len() < bsize {
            bpack.resize(bsize, E::default());
        }
        if apack.len() < asize {
            apack.resize(asize, E::default());
        }
        let (apack, bpack) = (&mut apack[..], &mut bpack[..]);
        let in_place = E::reads_a_in_place() && (a.rs == 1 || a.cs == 1);
        let mut jc = j0;
        while jc < j1 {
            let nc = NC.min(j1 - jc);
            let mut pc = 0;
            while pc < k {
                let kc = KC.min(k - pc);
                pack_b(b, pc, kc, jc, nc, bpack);
                // The first k-block writes C (unless accumulating), later ones add.
                let add = accumulate || pc > 0;
                let mut ic = 0;
                while ic < m {
                    let mc = MC.min(m - ic);
                    // Whole MR-row blocks of A are read where they lie
                    // when they can be; the rest is packed.
                    let whole = if in_place { mc / MR * MR } else { 0 };
                    if whole < mc {
                        pack_a(a, ic + whole, mc - whole, pc, kc, apack);
                    }
                    for jr in (0..nc).step_by(NR) {
                        let nr = NR.min(nc - jr);
                        let bp = &bpack[jr * kc..jr * kc + NR * kc];
                        for ir in (0..mc).step_by(MR) {
                            let mr = MR.min(mc - ir);
                            let at = (ic + ir) * ldc + jc + jr;
                            let end = at + (mr - 1) * ldc + nr;
                            if ir < whole {
                                let start = (ic + ir) * a.rs + pc * a.cs;
                                let done = E::kernel_in_place(
                                    kc,
                                    &a.data[start..],
                                    (a.rs, a.cs),
                                    bp,
                                    &mut c[at..end],
                                    ldc,
                                    nr,
                                    add,
                                );
                                assert!(done, "checked by reads_a_in_place");
                                continue;
                            }
                            let ap = &apack[(ir - whole) * kc..(ir - whole + MR) * kc];
                            E::kernel(kc, ap, bp, &mut c[at..end], ldc, (mr, nr), add);
                        }
                    }
                    ic += mc;
                }
                pc += kc;
            }
            jc += nc;
        }
    })
}

/// B[pc..pc+kc, jc..jc+nc] as NR-wide panels, each kc rows of NR values
/// (zero past the last column).
fn pack_b<E: Scalar>(b: View<E>, pc: usize, kc: usize, jc: usize, nc: usize, out: &mut [E]) {
    for (panel, j) in (0..nc).step_by(NR).enumerate() {
        let w = NR.min(nc - j);
        let dst = &mut out[panel * NR * kc..(panel + 1) * NR * kc];
        if b.rs == 1 && b.cs != 1 {
            // Columns contiguous (B = W^T): read each column once, in order.
            for q in 0..NR {
                if q < w {
                    let start = (jc + j + q) * b.cs + pc;
                    let col = &b.data[start..start + kc];
                    for (p, v) in col.iter().enumerate() {
                        dst[p * NR + q] = *v;
                    }
                } else {
                    for p in 0..kc {
                        dst[p * NR + q] = E::default();
                    }
                }
            }
            continue;
        }
        for p in 0..kc {
            let row = &mut dst[p * NR..(p + 1) * NR];
            if b.cs == 1 {
                let start = (pc + p) * b.rs + jc + j;
                row[..w].copy_from_slice(&b.data[start..start + w]);
            } else {
                for (q, slot) in row[..w].iter_mut().enumerate() {
                    *slot = b.at(pc + p, jc + j + q);
                }
            }
            row[w..].fill(E::default());
        }
    }
}

/// A[ic..ic+mc, pc..pc+kc] as MR-tall panels, each kc columns of MR values
/// (zero past the last row).
fn pack_a<E: Scalar>(a: View<E>, ic: usize, mc: usize, pc: usize, kc: usize, out: &mut [E]) {
    for (panel, i) in (0..mc).step_by(MR).enumerate() {
        let h = MR.min(mc - i);
        let dst = &mut out[panel * MR * kc..(panel + 1) * MR * kc];
        if a.rs == 1 {
            for p in 0..kc {
                let start = (pc + p) * a.cs + ic + i;
                dst[p * MR..p * MR + h].copy_from_slice(&a.data[start..start + h]);
                dst[p * MR + h..(p + 1) * MR].fill(E::default());
            }
        } else {
            for r in 0..MR {
                if r < h && a.cs == 1 {
                    let start = (ic + i + r) * a.rs + pc;
                    for (p, v) in a.data[start..start + kc].iter().enumerate() {
                        dst[p * MR + r] = *v;
                    }
                } else if r < h {
                    let row = &a.data[(ic + i + r) * a.rs..];
                    for p in 0..kc {
                        dst[p * MR + r] = row[(pc + p) * a.cs];
                    }
                } else {
                    for p in 0..kc {
                        dst[p * MR + r] = E::default();
                    }
                }
            }
        }
    }
}

/// The (mr x nr) corner of the product of A's 12 rows (element (i, p) at
/// `a[i * rs + p * cs]`, rs or cs 1) and a B panel, written (or added) to
/// C through the AVX-512 kernel: straight into C for a whole block, else
/// through a tile. The caller has checked that AVX-512F is present.
#[allow(clippy::too_many_arguments)]
fn block_avx512(
    kc: usize,
    a: &[f32],
    (rs, cs): (usize, usize),
    bp: &[f32],
    c: &mut [f32],
    ldc: usize,
    size: (usize, usize),
    add: bool,
) {
    assert!(
        kc > 0 && a.len() > (MR - 1) * rs + (kc - 1) * cs && bp.len() >= kc * NR,
        "A's block and B's panel are whole"
    );
    debug_assert!(has_avx512() && (rs == 1 || cs == 1));
    let (ap, bp) = (a.as_ptr(), bp.as_ptr());
    let run = |out: *mut f32, ld: usize, add: bool| {
        // SAFETY: AVX-512F is present (the caller checked); A's MR rows and
        // kc columns and B's panel lie inside the slices (asserted); `out`
        // is a whole MR x NR block (asserted below, or the tile).
        unsafe {
            if cs == 1 {
                kernel_avx512::<true>(kc, ap, (rs, cs), bp, out, ld, add)
            } else {
                kernel_avx512::<false>(kc, ap, (rs, cs), bp, out, ld, add)
            }
        }
    };
    if size == (MR, NR) {
        assert!(c.len() > (MR - 1) * ldc + NR - 1, "C's block is whole");
        run(c.as_mut_ptr(), ldc, add);
    } else {
        let mut tile = [0.0f32; MR * NR];
        run(tile.as_mut_ptr(), NR, false);
        write_tile(&tile, c, ldc, size, add);
    }
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn kernel_portable<E: Scalar>(kc: usize, ap: &[E], bp: &[E], tile: &mut [E; MR * NR]) {
    for p in 0..kc {
        let a = &ap[p * MR..(p + 1) * MR];
        let b = &bp[p * NR..(p + 1) * NR];
        for i in 0..MR {
            let ai = a[i];
            let row = &mut tile[i * NR..(i + 1) * NR];
            for j in 0..NR {
                row[j] += ai * b[j];
            }
        }
    }
}

/// Eight partial sums, so the loop vectorises.
fn dot_portable<E: Scalar>(x: &[E], y: &[E]) -> E {
    let mut acc = [E::default(); 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (xs, ys) in xc.zip(yc) {
        for l in 0..8 {
            acc[l] += xs[l] * ys[l];
        }
    }
    let mut total = acc.iter().fold(E::default(), |s, v| s + *v);
    for (a, b) in xr.iter().zip(yr) {
        total += *a * *b;
    }
    total
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot4x4_avx512(rows: [&[f32]; 4], cols: [&[f32]; 4]) -> [[f32; 4]; 4] {
    use std::arch::x86_64::*;
    let k = rows[0].len();
    debug_assert!(rows.iter().chain(&cols).all(|s| s.len() == k));
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    let mut p = 0;
    while p + 16 <= k {
        let x: [__m512; 4] = std::array::from_fn(|r| _mm512_loadu_ps(rows[r].as_ptr().add(p)));
        for q in 0..4 {
            let y = _mm512_loadu_ps(cols[q].as_ptr().add(p));
            for r in 0..4 {
                acc[r][q] = _mm512_fmadd_ps(x[r], y, acc[r][q]);
            }
        }
        p += 16;
    }
    let mut out = [[0.0f32; 4]; 4];
    for r in 0..4 {
        for q in 0..4 {
            let mut total = _mm512_reduce_add_ps(acc[r][q]);
            for t in p..k {
                total += rows[r][t] * cols[q][t];
            }
            out[r][q] = total;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot1x4_avx512(row: &[f32], cols: [&[f32]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let k = row.len();
    debug_assert!(cols.iter().all(|s| s.len() == k));
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut p = 0;
    while p + 16 <= k {
        let x = _mm512_loadu_ps(row.as_ptr().add(p));
        for q in 0..4 {
            acc[q] = _mm512_fmadd_ps(x, _mm512_loadu_ps(cols[q].as_ptr().add(p)), acc[q]);
        }
        p += 16;
    }
    let mut out = [0.0f32; 4];
    for q in 0..4 {
        let mut total = _mm512_reduce_add_ps(acc[q]);
        for t in p..k {
            total += row[t] * cols[q][t];
        }
        out[q] = total;
    }
    out
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot1x4_avx512(row: &[f32], cols: [&[f32]; 4]) -> [f32; 4] {
    dot1x4_portable(row, cols)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot4x4_avx512(rows: [&[f32]; 4], cols: [&[f32]; 4]) -> [[f32; 4]; 4] {
    dot4x4_portable(rows, cols)
}

/// The 12 x 32 block at `c` (rows `ldc` apart) = (or += with `add`) the
/// product of A's 12 rows and a B panel: 24 accumulators, A broadcast.
/// A's element (i, p) is at `a[i * rs + p * cs]`: a packed panel is
/// (1, MR); `ROWS` reads a row-major block in place (cs == 1) through one
/// pointer per row, else `rs` is 1 (a packed panel or a transposed
/// matrix read in place: each p's 12 values side by side).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_avx512<const ROWS: bool>(
    kc: usize,
    a: *const f32,
    (rs, cs): (usize, usize),
    bp: *const f32,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 2 * MR];
    let mut b = bp;
    if ROWS {
        let rows: [*const f32; MR] = std::array::from_fn(|i| a.add(i * rs));
        for p in 0..kc {
            let b0 = _mm512_loadu_ps(b);
            let b1 = _mm512_loadu_ps(b.add(16));
            for i in 0..MR {
                let ai = _mm512_set1_ps(*rows[i].add(p));
                acc[2 * i] = _mm512_fmadd_ps(ai, b0, acc[2 * i]);
                acc[2 * i + 1] = _mm512_fmadd_ps(ai, b1, acc[2 * i + 1]);
            }
            b = b.add(NR);
        }
    } else {
        debug_assert_eq!(rs, 1);
        let mut a = a;
        for _ in 0..kc {
            let b0 = _mm512_loadu_ps(b);
            let b1 = _mm512_loadu_ps(b.add(16));
            for i in 0..MR {
                let ai = _mm512_set1_ps(*a.add(i));
                acc[2 * i] = _mm512_fmadd_ps(ai, b0, acc[2 * i]);
                acc[2 * i + 1] = _mm512_fmadd_ps(ai, b1, acc[2 * i + 1]);
            }
            a = a.add(cs);
            b = b.add(NR);
        }
    }
    for i in 0..MR {
        let row = c.add(i * ldc);
        let (mut lo, mut hi) = (acc[2 * i], acc[2 * i + 1]);
        if add {
            lo = _mm512_add_ps(lo, _mm512_loadu_ps(row));
            hi = _mm512_add_ps(hi, _mm512_loadu_ps(row.add(16)));
        }
        _mm512_storeu_ps(row, lo);
        _mm512_storeu_ps(row.add(16), hi);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel_avx512<const ROWS: bool>(
    _: usize,
    _: *const f32,
    _: (usize, usize),
    _: *const f32,
    _: *mut f32,
    _: usize,
    _: bool,
) {
    unreachable!("has_avx512() is false off x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: View<f32>, b: View<f32>) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a.at(i, p) as f64 * b.at(p, j) as f64).sum();
            }
        }
        c
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    fn check(m: usize, n: usize, k: usize, ta: bool, tb: bool, accumulate: bool) {
        let ad = values(m * k, 1);
        let bd = values(k * n, 2);
        let a = if ta {
            View::transposed(&ad, m) // stored (k x m)
        } else {
            View::row_major(&ad, k)
        };
        let b = if tb {
            View::transposed(&bd, k) // stored (n x k)
        } else {
            View::row_major(&bd, n)
        };
        let start = values(m * n, 3);
        let mut c = start.clone();
        gemm(m, n, k, a, b, &mut c, accumulate);
        let want = naive(m, n, k, a, b);
        for (i, (got, w)) in c.iter().zip(&want).enumerate() {
            let w = w + if accumulate { start[i] as f64 } else { 0.0 };
            assert!(
                (*got as f64 - w).abs() <= 1e-4 * (1.0 + (k as f64).sqrt()),
                "{m}x{n}x{k} ta={ta} tb={tb} acc={accumulate} at {i}: {got} vs {w}"
            );
        }
    }

    #[test]
    fn equals_the_naive_product_at_edge_shapes_and_strides() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 33, 7),
            (16, 100, 70),
            (17, 40, 9),
            (13, 31, 5),
            (12, 32, 256),
            (25, 65, 257),
            (150, 70, 300),
            (3, 2100, 20),
        ] {
            for ta in [false, true] {
                for tb in [false, true] {
                    check(m, n, k, ta, tb, false);
                }
            }
            check(m, n, k, false, true, true);
        }
    }

    #[test]
    fn reading_a_in_place_gives_the_packed_bits() {
        // A row-major or transposed A is read in place (whole 12-row blocks);
        // the same A with a column stride of 2 is always packed.
        for (m, n, k) in [(150, 70, 300), (36, 33, 17), (25, 64, 257)] {
            let ad = values(m * k, 10);
            let bd = values(k * n, 11);
            let b = View::transposed(&bd, k);
            let spread: Vec<f32> = ad.iter().flat_map(|x| [*x, 9.0]).collect();
            let packed = View {
                data: &spread,
                rs: 2 * k,
                cs: 2,
            };
            let mut want = vec![0.0; m * n];
            gemm(m, n, k, packed, b, &mut want, false);
            let mut got = vec![0.0; m * n];
            gemm(m, n, k, View::row_major(&ad, k), b, &mut got, false);
            assert_eq!(got, want, "row-major A, {m}x{n}x{k}");
            let at: Vec<f32> = (0..k * m).map(|x| ad[(x % m) * k + x / m]).collect();
            let mut got = vec![0.0; m * n];
            gemm(m, n, k, View::transposed(&at, m), b, &mut got, false);
            assert_eq!(got, want, "transposed A, {m}x{n}x{k}");
        }
    }

    #[test]
    fn threaded_split_equals_one_thread() {
        // Packed (70 rows) and few-row (4 rows, B = W^T) products.
        for (m, n, k) in [(70, 300, 200), (4, 3000, 300)] {
            let ad = values(m * k, 4);
            let bd = values(k * n, 5);
            let (a, b) = (View::row_major(&ad, k), View::transposed(&bd, k));
            let on = |threads: usize| {
                let mut c = vec![0.0; m * n];
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| gemm(m, n, k, a, b, &mut c, false));
                c
            };
            assert_eq!(on(1), on(3), "each element is summed in the same order");
        }
    }

    #[test]
    fn a_row_alone_or_among_others_gets_the_same_bits() {
        // Generation relies on it: a prompt alone or in a batch, the same tokens.
        let (n, k) = (9, 70);
        let ad = values(6 * k, 8);
        let bd = values(k * n, 9);
        let b = View::transposed(&bd, k);
        let mut all = vec![0.0; 6 * n];
        gemm(6, n, k, View::row_major(&ad, k), b, &mut all, false);
        for i in 0..6 {
            let mut one = vec![0.0; n];
            gemm(
                1,
                n,
                k,
                View::row_major(&ad[i * k..(i + 1) * k], k),
                b,
                &mut one,
                false,
            );
            assert_eq!(one, all[i * n..(i + 1) * n], "row {i}");
        }
    }

    #[test]
    fn avx512_and_portable_kernels_agree() {
        let kc = 37;
        let ap = values(kc * MR, 6);
        let bp = values(kc * NR, 7);
        let mut x = [0.0; MR * NR];
        kernel_portable(kc, &ap, &bp, &mut x);
        if has_avx512() {
            let mut y = [0.0; MR * NR];
            unsafe {
                kernel_avx512::<false>(
                    kc,
                    ap.as_ptr(),
                    (1, MR),
                    bp.as_ptr(),
                    y.as_mut_ptr(),
                    NR,
                    false,
                )
            };
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }
}
