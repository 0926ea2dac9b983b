//! The Llama layer's element-wise parts over plain host slices, forward and
//! backward: RMSNorm, SwiGLU, rotary embeddings, and a row softmax. The
//! CPU's fused dfdx ops (`kernels`) and the whole-stack decoder op
//! (`decoder`) both compute with these, so the maths is written once.
//!
//! Layouts are row-major; a "row" is one token (or one head of a token for
//! the per-head norm). Backward functions add into their gradient outputs.

use dfdx::prelude::Dtype;
use num_traits::Float;
use rayon::prelude::*;

use super::gemm::Scalar;

/// An element type the host kernels compute in: f32 for training (with
/// [`super::kernels::fast_exp`]), f64 for the gradient checks (std's exp).
pub trait HostFloat: Dtype + Scalar + Float + From<f32> {
    fn fexp(self) -> Self;
    fn of(x: f64) -> Self;
}

impl HostFloat for f32 {
    fn fexp(self) -> f32 {
        super::kernels::fast_exp(self)
    }
    fn of(x: f64) -> f32 {
        x as f32
    }
}

impl HostFloat for f64 {
    fn fexp(self) -> f64 {
        self.exp()
    }
    fn of(x: f64) -> f64 {
        x
    }
}

/// Rows per parallel task of the row-wise ops, and elements per task of
/// the element-wise ones: fixed, so results do not depend on the number
/// of threads (inside a training worker's one-thread pool they run in order).
const ROWS: usize = 16;
const ELEMS: usize = 8192;

/// RMSNorm of each `width`-wide row: `x / sqrt(mean(x^2) + eps) * w`,
/// and each row's `1 / sqrt(mean(x^2) + eps)` for the backward.
pub fn rms_forward<E: HostFloat>(x: &[E], w: &[E], width: usize, eps: f64) -> (Vec<E>, Vec<E>) {
    let (eps, n) = (E::of(eps), E::of(width as f64));
    let mut inv = vec![E::zero(); x.len() / width];
    let mut y = vec![E::zero(); x.len()];
    let blocks = y.par_chunks_mut(width * ROWS).zip(inv.par_chunks_mut(ROWS));
    blocks
        .zip(x.par_chunks(width * ROWS))
        .for_each(|((yb, ib), xb)| {
            let rows = yb.chunks_exact_mut(width).zip(xb.chunks_exact(width));
            for ((yr, xr), r) in rows.zip(ib) {
                *r = (lanes::dot(xr, xr) / n + eps).sqrt().recip();
                for ((o, &v), &wc) in yr.iter_mut().zip(xr).zip(w) {
                    *o = v * *r * wc;
                }
            }
        });
    (y, inv)
}

/// Adds the RMSNorm's input gradient to `gx` and, when given, its weight
/// gradient to `gw`, from the output gradient `gy`.
pub fn rms_backward<E: HostFloat>(
    gy: &[E],
    x: &[E],
    inv: &[E],
    w: &[E],
    width: usize,
    gx: &mut [E],
    gw: Option<&mut [E]>,
) {
    let n = E::of(width as f64);
    let want_w = gw.is_some();
    let blocks = gx.par_chunks_mut(width * ROWS).zip(inv.par_chunks(ROWS));
    let inputs = x.par_chunks(width * ROWS).zip(gy.par_chunks(width * ROWS));
    // Each block's part of the weight gradient, summed below in block order.
    let parts: Vec<Vec<E>> = blocks
        .zip(inputs)
        .map(|((gxb, ib), (xb, gb))| {
            let mut part = vec![E::zero(); if want_w { width } else { 0 }];
            let rows = xb.chunks_exact(width).zip(gb.chunks_exact(width));
            for ((&r, (xr, gr)), gxr) in ib.iter().zip(rows).zip(gxb.chunks_exact_mut(width)) {
                // d/dx_k = g_k w_k r - x_k r^3 / H * sum_c g_c w_c x_c
                let dot = (0..width).fold(E::zero(), |a, c| a + gr[c] * w[c] * xr[c]);
                let k = r * r * r * dot / n;
                for c in 0..width {
                    gxr[c] += gr[c] * w[c] * r - xr[c] * k;
                }
                if want_w {
                    for c in 0..width {
                        part[c] += gr[c] * xr[c] * r;
                    }
                }
            }
            part
        })
        .collect();
    if let Some(gw) = gw {
        for part in parts {
            add_assign(gw, &part);
        }
    }
}

fn sigmoid<E: HostFloat>(x: E) -> E {
    E::one() / (E::one() + (-x).fexp())
}

/// `silu(gate) * up`.
pub fn swiglu_forward<E: HostFloat>(gate: &[E], up: &[E]) -> Vec<E> {
    let mut out = vec![E::zero(); gate.len()];
    let inputs = gate.par_chunks(ELEMS).zip(up.par_chunks(ELEMS));
    out.par_chunks_mut(ELEMS)
        .zip(inputs)
        .for_each(|(o, (g, u))| {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g * sigmoid(g) * u;
            }
        });
    out
}

/// The gradients of gate and up from the output gradient `gy` (returned,
/// not added: each has one use).
pub fn swiglu_backward<E: HostFloat>(gy: &[E], gate: &[E], up: &[E]) -> (Vec<E>, Vec<E>) {
    let mut dg = vec![E::zero(); gy.len()];
    let mut du = vec![E::zero(); gy.len()];
    let outs = dg.par_chunks_mut(ELEMS).zip(du.par_chunks_mut(ELEMS));
    let inputs = gy
        .par_chunks(ELEMS)
        .zip(gate.par_chunks(ELEMS).zip(up.par_chunks(ELEMS)));
    outs.zip(inputs).for_each(|((dg, du), (gy, (gate, up)))| {
        for (((dg, du), &o), (&x, &u)) in dg.iter_mut().zip(du).zip(gy).zip(gate.iter().zip(up)) {
            let s = sigmoid(x);
            // silu'(x) = s (1 + x (1 - s)), s = sigmoid(x)
            *dg = o * u * s * (E::one() + x * (E::one() - s));
            *du = o * x * s;
        }
    });
    (dg, du)
}

/// Rotary embedding (Hugging Face `rotate_half`) in place over rows of
/// `heads` heads of `hd`; `cos`/`sin` hold one `hd`-wide row per token.
pub fn rope_forward<E: HostFloat>(x: &mut [E], cos: &[E], sin: &[E], heads: usize, hd: usize) {
    rope_rows(x, cos, sin, heads, hd, false);
}

/// The rotary embedding's input gradient in place of its output gradient.
pub fn rope_backward<E: HostFloat>(g: &mut [E], cos: &[E], sin: &[E], heads: usize, hd: usize) {
    rope_rows(g, cos, sin, heads, hd, true);
}

/// y = x cos + rotate_half(x) sin per head (forward), or its transpose
/// g cos + rotate_half^T(g sin) = [g2 sin2, -g1 sin1] (`back`), in place.
fn rope_rows<E: HostFloat>(x: &mut [E], cos: &[E], sin: &[E], heads: usize, hd: usize, back: bool) {
    let half = hd / 2;
    let tokens = x.par_chunks_mut(heads * hd * ROWS);
    tokens.enumerate().for_each(|(blk, xb)| {
        let mut tmp = vec![E::zero(); hd];
        for (i, head) in xb.chunks_exact_mut(hd).enumerate() {
            let at = (blk * ROWS + i / heads) * hd;
            let (cs, sn) = (&cos[at..at + hd], &sin[at..at + hd]);
            tmp.copy_from_slice(head);
            for j in 0..hd {
                let other = match (back, j < half) {
                    (false, true) => -tmp[j + half] * sn[j],
                    (false, false) => tmp[j - half] * sn[j],
                    (true, true) => tmp[j + half] * sn[j + half],
                    (true, false) => -tmp[j - half] * sn[j - half],
                };
                head[j] = tmp[j] * cs[j] + other;
            }
        }
    });
}

/// Softmax of a row in place; exp of each entry minus the row's maximum.
pub fn softmax_in_place<E: HostFloat>(z: &mut [E]) {
    let max = lanes::max(z);
    z.iter_mut().for_each(|x| *x = (*x - max).fexp());
    let inv = lanes::sum(z).recip();
    z.iter_mut().for_each(|x| *x *= inv);
}

/// `dz = p (g - sum_j g_j p_j) * scale` in place of g: a softmax row's
/// input gradient from its output gradient (and a scale on the input).
pub fn softmax_backward_in_place<E: HostFloat>(g: &mut [E], p: &[E], scale: E) {
    let dot = lanes::dot(p, g);
    for (gk, &pk) in g.iter_mut().zip(p) {
        *gk = scale * pk * (*gk - dot);
    }
}

/// `acc += x`, element by element.
pub fn add_assign<E: HostFloat>(acc: &mut [E], x: &[E]) {
    if acc.len() <= ELEMS {
        acc.iter_mut().zip(x).for_each(|(a, &b)| *a += b);
        return;
    }
    acc.par_chunks_mut(ELEMS)
        .zip(x.par_chunks(ELEMS))
        .for_each(|(a, x)| a.iter_mut().zip(x).for_each(|(a, &b)| *a += b));
}

/// Reductions in 8 independent lanes: a sequential float sum cannot be
/// vectorized (addition is not associative), eight partial sums can.
pub mod lanes {
    use num_traits::Float;

    pub fn sum<E: Float>(v: &[E]) -> E {
        let mut acc = [E::zero(); 8];
        let chunks = v.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..8 {
                acc[i] = acc[i] + c[i];
            }
        }
        rest.iter()
            .fold(acc.iter().fold(E::zero(), |a, &b| a + b), |a, &b| a + b)
    }

    pub fn dot<E: Float>(a: &[E], b: &[E]) -> E {
        assert_eq!(a.len(), b.len());
        let mut acc = [E::zero(); 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let tail = ca.remainder().iter().zip(cb.remainder());
        let tail = tail.fold(E::zero(), |s, (&x, &y)| s + x * y);
        for (x, y) in ca.zip(cb) {
            for i in 0..8 {
                acc[i] = acc[i] + x[i] * y[i];
            }
        }
        acc.iter().fold(tail, |s, &v| s + v)
    }

    pub fn max<E: Float>(v: &[E]) -> E {
        let mut acc = [E::neg_infinity(); 8];
        let chunks = v.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..8 {
                acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
            }
        }
        let m = acc
            .iter()
            .fold(E::neg_infinity(), |m, &x| if x > m { x } else { m });
        rest.iter().fold(m, |m, &x| if x > m { x } else { m })
    }
}
