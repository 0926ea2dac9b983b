//! The decoder stack (every layer, then the final RMSNorm) as one op on
//! the CPU, its forward and backward written out over host buffers.
//!
//! Through dfdx a layer is some forty tensor ops, each allocating a
//! zero-filled output and, under a tape, a zero-filled gradient buffer,
//! and each reading its inputs by copying them out of dfdx's storage:
//! that bookkeeping, not the arithmetic, was most of a training step
//! (README's profile). Here each activation is computed once into a plain
//! buffer, the backward keeps only what it needs (the layer's input, the
//! attention probabilities, the projections' outputs; the norms' outputs
//! are recomputed), and every parameter's gradient is accumulated straight
//! into dfdx's gradient buffer by [`gemm`]. The maths is `llama.rs`'s
//! (`decoder_layers`, which other devices run); tests check the two
//! against each other forward and backward in f64, and the model's
//! finite-difference checks run through this op.
//!
//! Attention runs one task per (sequence, head) forward and per (sequence,
//! key/value head) backward, so a key/value head's gradient is summed by
//! one task in a fixed order: results do not depend on the thread count.

use dfdx::prelude::*;
use rayon::prelude::*;

use super::gemm::{gemm, View};
use super::host_ops::{self as ops, HostFloat};
use super::kernels::host;
use super::llama::{Rope, T3};
use super::params::{Layer, LlamaParams, Matrix};

/// A parameter, kept (its buffer shared) to name its gradient.
type Ghost<E> = Matrix<E, Cpu>;

/// A host element type whose dfdx CPU gradient buffers read as slices
/// (dfdx names their storage type only through `Storage::Vec`).
pub trait CpuFloat: HostFloat
where
    Cpu: Storage<Self>,
{
    fn slice(v: &mut <Cpu as Storage<Self>>::Vec) -> &mut [Self];
}

impl CpuFloat for f32 {
    fn slice(v: &mut <Cpu as Storage<f32>>::Vec) -> &mut [f32] {
        v
    }
}

impl CpuFloat for f64 {
    fn slice(v: &mut <Cpu as Storage<f64>>::Vec) -> &mut [f64] {
        v
    }
}

/// The gradient buffer of `id` (zeros when new).
fn grad<'a, E: CpuFloat>(
    grads: &'a mut Gradients<E, Cpu>,
    id: &Ghost<E>,
) -> Result<&'a mut [E], CpuError>
where
    Cpu: Device<E>,
{
    Ok(E::slice(grads.get_or_alloc_mut(id)?))
}

/// The sizes of one call.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    seq: usize,
    /// batch * seq: rows of every activation.
    m: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    eps: f64,
}

impl Dims {
    fn q_width(&self) -> usize {
        self.heads * self.hd
    }
    fn kv_width(&self) -> usize {
        self.kv_heads * self.hd
    }
}

/// A LoRA adapter on the host: A (r, in), B (out, r), the scale and the
/// dropout on its input.
struct Adapter<E: HostFloat> {
    a: Vec<E>,
    b: Vec<E>,
    r: usize,
    scale: E,
    dropout: f64,
    ids: (Ghost<E>, Ghost<E>),
}

/// What an adapter's backward needs of its forward: `scale x' A^T` (m, r)
/// for x' the input after dropout, and the dropout mask's key (none: x' = x).
struct AdapterIn<E> {
    xa: Vec<E>,
    mask: Option<u64>,
}

impl<E: HostFloat> Adapter<E> {
    /// The dropout mask of `key` over `len` elements (none without a key).
    fn mask(&self, key: Option<u64>, len: usize) -> Option<Vec<E>> {
        key.map(|key| super::lora::dropout::mask::<E>(key, self.dropout, len))
    }

    /// The adapter's input x' (m, k): x itself, or x times the mask.
    fn input<'a>(x: &'a [E], mask: Option<&[E]>) -> std::borrow::Cow<'a, [E]> {
        match mask {
            None => std::borrow::Cow::Borrowed(x),
            Some(mask) => x.iter().zip(mask).map(|(v, m)| *v * *m).collect(),
        }
    }
}

/// One projection on the host: weight (n, k), optional bias and adapter.
struct Linear<E: HostFloat> {
    w: Vec<E>,
    bias: Option<Vec<E>>,
    n: usize,
    k: usize,
    adapter: Option<Adapter<E>>,
    /// Base weight and bias train (no adapters on the layer).
    train_base: bool,
    ids: (Ghost<E>, Option<Ghost<E>>),
}

impl<E: CpuFloat> Linear<E>
where
    Cpu: Device<E>,
{
    fn load(
        layer: &Layer<E, Cpu>,
        target: &str,
        w: &Matrix<E, Cpu>,
        bias: Option<&Matrix<E, Cpu>>,
    ) -> Self {
        let (n, k) = *w.shape();
        let adapter = layer.lora.as_ref().and_then(|l| {
            l.adapters.get(target).map(|(a, b)| Adapter {
                a: host(a),
                b: host(b),
                r: a.shape().0,
                scale: E::of(l.scale),
                dropout: l.dropout,
                ids: (a.clone(), b.clone()),
            })
        });
        Linear {
            w: host(w),
            bias: bias.map(host),
            n,
            k,
            adapter,
            train_base: layer.lora.is_none(),
            ids: (w.clone(), bias.cloned()),
        }
    }

    /// `x w^T + b + scale (x' A^T) B^T` for x (m, k), x' = x after the
    /// adapter's dropout (inside [`super::lora::dropout::scoped`]); with an
    /// adapter also what its backward needs.
    fn forward(&self, x: &[E], m: usize) -> (Vec<E>, Option<AdapterIn<E>>) {
        let (n, k) = (self.n, self.k);
        let mut y = vec![E::zero(); m * n];
        gemm(
            m,
            n,
            k,
            View::row_major(x, k),
            View::transposed(&self.w, k),
            &mut y,
            false,
        );
        if let Some(b) = &self.bias {
            y.chunks_exact_mut(n)
                .for_each(|row| ops::add_assign(row, b));
        }
        let xa = self.adapter.as_ref().map(|ad| {
            let mask = super::lora::dropout::next_key(ad.dropout);
            let keep = ad.mask(mask, x.len());
            let input = Adapter::input(x, keep.as_deref());
            let mut xa = vec![E::zero(); m * ad.r];
            let (xv, at) = (View::row_major(&input, k), View::transposed(&ad.a, k));
            gemm(m, ad.r, k, xv, at, &mut xa, false);
            xa.iter_mut().for_each(|v| *v *= ad.scale);
            let bt = View::transposed(&ad.b, ad.r);
            gemm(m, n, ad.r, View::row_major(&xa, ad.r), bt, &mut y, true);
            AdapterIn { xa, mask }
        });
        (y, xa)
    }

    /// From the output gradient `dy` (m, n) of input `x`: adds the input
    /// gradient to `dx` and the trained parameters' gradients to `grads`.
    fn backward(
        &self,
        grads: &mut Gradients<E, Cpu>,
        dy: &[E],
        x: &[E],
        saved: Option<&AdapterIn<E>>,
        m: usize,
        dx: &mut [E],
    ) -> Result<(), CpuError> {
        let (n, k) = (self.n, self.k);
        let dyv = View::row_major(dy, n);
        // dx (m, k) += dy (m, n) w (n, k)
        gemm(m, k, n, dyv, View::row_major(&self.w, k), dx, true);
        if self.train_base {
            // dw (n, k) += dy^T (n, m) x (m, k)
            let gw = grad(grads, &self.ids.0)?;
            let (dyt, xv) = (View::transposed(dy, n), View::row_major(x, k));
            gemm(n, k, m, dyt, xv, gw, true);
            if let Some(id) = &self.ids.1 {
                let gb = grad(grads, id)?;
                dy.chunks_exact(n).for_each(|row| ops::add_assign(gb, row));
            }
        }
        if let (Some(ad), Some(AdapterIn { xa, mask })) = (&self.adapter, saved) {
            let r = ad.r;
            // y += (s x A^T) B^T: dB (n, r) += dy^T (s x A^T)
            let gb = grad(grads, &ad.ids.1)?;
            gemm(
                n,
                r,
                m,
                View::transposed(dy, n),
                View::row_major(xa, r),
                gb,
                true,
            );
            // d(x A^T) = s dy B: (m, r)
            let mut dxa = vec![E::zero(); m * r];
            gemm(m, r, n, dyv, View::row_major(&ad.b, r), &mut dxa, false);
            dxa.iter_mut().for_each(|v| *v *= ad.scale);
            // dA (r, k) += d(x' A^T)^T x';  dx += (d(x' A^T) A) * mask
            let ga = grad(grads, &ad.ids.0)?;
            let keep = ad.mask(*mask, m * k);
            let input = Adapter::input(x, keep.as_deref());
            let xv = View::row_major(&input, k);
            gemm(r, k, m, View::transposed(&dxa, r), xv, ga, true);
            drop(input);
            let dxv = View::row_major(&dxa, r);
            match keep {
                None => gemm(m, k, r, dxv, View::row_major(&ad.a, k), dx, true),
                Some(keep) => {
                    let mut dxd = vec![E::zero(); m * k];
                    gemm(m, k, r, dxv, View::row_major(&ad.a, k), &mut dxd, false);
                    for ((d, g), w) in dx.iter_mut().zip(&dxd).zip(&keep) {
                        *d += *g * *w;
                    }
                }
            }
        }
        Ok(())
    }
}

/// A norm weight on the host with its gradient's id.
struct Norm<E: HostFloat> {
    w: Vec<E>,
    id: Ghost<E>,
}

impl<E: CpuFloat> Norm<E>
where
    Cpu: Device<E>,
{
    fn load(w: &Matrix<E, Cpu>) -> Self {
        Norm {
            w: host(w),
            id: w.clone(),
        }
    }

    /// Adds the input gradient to `gx` and, when `train`, the weight's.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        grads: &mut Gradients<E, Cpu>,
        gy: &[E],
        x: &[E],
        inv: &[E],
        width: usize,
        gx: &mut [E],
        train: bool,
    ) -> Result<(), CpuError> {
        let gw = if train {
            Some(grad(grads, &self.id)?)
        } else {
            None
        };
        ops::rms_backward(gy, x, inv, &self.w, width, gx, gw);
        Ok(())
    }
}

/// One layer's weights on the host (copied in, used, dropped: the
/// backward copies them again rather than keep a second model in memory).
struct HostLayer<E: HostFloat> {
    input_norm: Norm<E>,
    post_norm: Norm<E>,
    q_norm: Option<Norm<E>>,
    k_norm: Option<Norm<E>>,
    q: Linear<E>,
    k: Linear<E>,
    v: Linear<E>,
    o: Linear<E>,
    gate: Linear<E>,
    up: Linear<E>,
    down: Linear<E>,
}

impl<E: CpuFloat> HostLayer<E>
where
    Cpu: Device<E>,
{
    fn load(l: &Layer<E, Cpu>) -> Self {
        HostLayer {
            input_norm: Norm::load(&l.input_layernorm),
            post_norm: Norm::load(&l.post_attention_layernorm),
            q_norm: l.q_norm.as_ref().map(Norm::load),
            k_norm: l.k_norm.as_ref().map(Norm::load),
            q: Linear::load(l, "q_proj", &l.q_proj, l.q_bias.as_ref()),
            k: Linear::load(l, "k_proj", &l.k_proj, l.k_bias.as_ref()),
            v: Linear::load(l, "v_proj", &l.v_proj, l.v_bias.as_ref()),
            o: Linear::load(l, "o_proj", &l.o_proj, l.o_bias.as_ref()),
            gate: Linear::load(l, "gate_proj", &l.gate_proj, l.gate_bias.as_ref()),
            up: Linear::load(l, "up_proj", &l.up_proj, l.up_bias.as_ref()),
            down: Linear::load(l, "down_proj", &l.down_proj, l.down_bias.as_ref()),
        }
    }
}

/// The batch's rotary tables and attention bias on the host.
struct Consts<E: HostFloat> {
    cos: Vec<E>,
    sin: Vec<E>,
    /// (batch, seq, seq): 0 where the query sees the key, else -1e9.
    bias: Vec<E>,
}

/// q or k before a per-head norm, with its inverse RMS (None: no norm).
type PreNorm<E> = Option<(Vec<E>, Vec<E>)>;

/// What a layer's backward needs of its forward.
struct Saved<E: HostFloat> {
    /// The layer's input and its input norm's inverse RMS.
    x: Vec<E>,
    r1: Vec<E>,
    /// Queries and keys before the per-head norm, with its inverse RMS.
    q_pre: PreNorm<E>,
    k_pre: PreNorm<E>,
    /// Queries and keys after the rotary embedding; values.
    q: Vec<E>,
    k: Vec<E>,
    v: Vec<E>,
    /// (batch, heads, seq, seq)
    probs: Vec<E>,
    /// Attention output, the input of o_proj.
    o: Vec<E>,
    /// The residual after attention, its norm's inverse RMS.
    x1: Vec<E>,
    r2: Vec<E>,
    gate: Vec<E>,
    up: Vec<E>,
    /// Each projection's adapter state (`scale x' A^T`, dropout mask), in
    /// the order q, k, v, o, gate, up, down.
    xa: [Option<AdapterIn<E>>; 7],
}

/// Per-head RMSNorm of q or k (rows of `hd`): normed values, and the input
/// with its inverse RMS when the layer has the norm.
fn head_norm<E: CpuFloat>(x: Vec<E>, norm: Option<&Norm<E>>, d: &Dims) -> (Vec<E>, PreNorm<E>)
where
    Cpu: Device<E>,
{
    match norm {
        None => (x, None),
        Some(n) => {
            let (y, inv) = ops::rms_forward(&x, &n.w, d.hd, d.eps);
            (y, Some((x, inv)))
        }
    }
}

/// 1 / sqrt(hd), rounded through f32 as the layer-by-layer stack has it.
fn attention_scale<E: HostFloat>(hd: usize) -> E {
    <E as From<f32>>::from((1.0 / (hd as f64).sqrt()) as f32)
}

/// `softmax(q k^T / sqrt(hd) + bias) v` for every (sequence, head), query
/// head h reading key/value head h / (heads / kv_heads): the output (m,
/// heads * hd) and the probabilities.
fn attention_forward<E: CpuFloat>(
    d: &Dims,
    q: &[E],
    k: &[E],
    v: &[E],
    bias: &[E],
) -> (Vec<E>, Vec<E>)
where
    Cpu: Device<E>,
{
    let (s, hd, nh) = (d.seq, d.hd, d.heads);
    let group = nh / d.kv_heads;
    let (qw, kw) = (d.q_width(), d.kv_width());
    let scale = attention_scale::<E>(hd);
    let mut probs = vec![E::zero(); d.batch * nh * s * s];
    let outs: Vec<Vec<E>> = probs
        .par_chunks_mut(s * s)
        .enumerate()
        .map(|(i, p)| {
            let (b, h) = (i / nh, i % nh);
            let kv0 = b * s * kw + (h / group) * hd;
            let qv = View::row_major(&q[b * s * qw + h * hd..], qw);
            gemm(s, s, hd, qv, View::transposed(&k[kv0..], kw), p, false);
            let rows = p.chunks_exact_mut(s).zip(bias[b * s * s..].chunks_exact(s));
            for (row, brow) in rows {
                // A masked key (bias -1e9) underflows to exactly 0.
                row.iter_mut()
                    .zip(brow)
                    .for_each(|(x, &bb)| *x = *x * scale + bb);
                ops::softmax_in_place(row);
            }
            let mut o = vec![E::zero(); s * hd];
            let (pv, vv) = (View::row_major(p, s), View::row_major(&v[kv0..], kw));
            gemm(s, hd, s, pv, vv, &mut o, false);
            o
        })
        .collect();
    let mut out = vec![E::zero(); d.m * qw];
    for (i, o) in outs.iter().enumerate() {
        let (b, h) = (i / nh, i % nh);
        for (t, row) in o.chunks_exact(hd).enumerate() {
            let at = (b * s + t) * qw + h * hd;
            out[at..at + hd].copy_from_slice(row);
        }
    }
    (out, probs)
}

/// The gradients of q, k and v (as laid out forward) from the attention
/// output's gradient `dout` (m, heads * hd).
fn attention_backward<E: CpuFloat>(d: &Dims, sv: &Saved<E>, dout: &[E]) -> (Vec<E>, Vec<E>, Vec<E>)
where
    Cpu: Device<E>,
{
    let (s, hd, nh, nkv) = (d.seq, d.hd, d.heads, d.kv_heads);
    let group = nh / nkv;
    let (qw, kw) = (d.q_width(), d.kv_width());
    let scale = attention_scale::<E>(hd);
    let (q, k, v) = (&sv.q, &sv.k, &sv.v);
    // One task per (sequence, key/value head): its query heads' dq, its dk, dv.
    let parts: Vec<(Vec<E>, Vec<E>, Vec<E>)> = (0..d.batch * nkv)
        .into_par_iter()
        .map(|i| {
            let (b, g) = (i / nkv, i % nkv);
            let kv0 = b * s * kw + g * hd;
            let kv = View::row_major(&k[kv0..], kw);
            let mut dq = vec![E::zero(); group * s * hd];
            let mut dk = vec![E::zero(); s * hd];
            let mut dv = vec![E::zero(); s * hd];
            let mut ds = vec![E::zero(); s * s];
            for (j, dqh) in dq.chunks_exact_mut(s * hd).enumerate() {
                let h = g * group + j;
                let p = &sv.probs[(b * nh + h) * s * s..][..s * s];
                let q0 = b * s * qw + h * hd;
                let dov = View::row_major(&dout[q0..], qw);
                // dP = dO V^T; dV += P^T dO
                gemm(
                    s,
                    s,
                    hd,
                    dov,
                    View::transposed(&v[kv0..], kw),
                    &mut ds,
                    false,
                );
                gemm(s, hd, s, View::transposed(p, s), dov, &mut dv, true);
                for (dr, pr) in ds.chunks_exact_mut(s).zip(p.chunks_exact(s)) {
                    ops::softmax_backward_in_place(dr, pr, scale);
                }
                // dQ = dS K; dK += dS^T Q
                gemm(s, hd, s, View::row_major(&ds, s), kv, dqh, false);
                let qv = View::row_major(&q[q0..], qw);
                gemm(s, hd, s, View::transposed(&ds, s), qv, &mut dk, true);
            }
            (dq, dk, dv)
        })
        .collect();
    let mut dq = vec![E::zero(); d.m * qw];
    let mut dk = vec![E::zero(); d.m * kw];
    let mut dv = vec![E::zero(); d.m * kw];
    for (i, (pq, pk, pv)) in parts.iter().enumerate() {
        let (b, g) = (i / nkv, i % nkv);
        for t in 0..s {
            let row = b * s + t;
            for j in 0..group {
                let at = row * qw + (g * group + j) * hd;
                dq[at..at + hd].copy_from_slice(&pq[(j * s + t) * hd..][..hd]);
            }
            let at = row * kw + g * hd;
            dk[at..at + hd].copy_from_slice(&pk[t * hd..][..hd]);
            dv[at..at + hd].copy_from_slice(&pv[t * hd..][..hd]);
        }
    }
    (dq, dk, dv)
}

/// One layer forward: its output, and what the backward needs when `keep`.
fn layer_forward<E: CpuFloat>(
    d: &Dims,
    l: &HostLayer<E>,
    c: &Consts<E>,
    x: Vec<E>,
    keep: bool,
) -> (Vec<E>, Option<Saved<E>>)
where
    Cpu: Device<E>,
{
    let (m, h) = (d.m, d.hidden);
    let (n1, r1) = ops::rms_forward(&x, &l.input_norm.w, h, d.eps);
    let (q, xa_q) = l.q.forward(&n1, m);
    let (k, xa_k) = l.k.forward(&n1, m);
    let (v, xa_v) = l.v.forward(&n1, m);
    drop(n1);
    let (mut q, q_pre) = head_norm(q, l.q_norm.as_ref(), d);
    let (mut k, k_pre) = head_norm(k, l.k_norm.as_ref(), d);
    ops::rope_forward(&mut q, &c.cos, &c.sin, d.heads, d.hd);
    ops::rope_forward(&mut k, &c.cos, &c.sin, d.kv_heads, d.hd);
    let (o, probs) = attention_forward(d, &q, &k, &v, &c.bias);
    let (mut x1, xa_o) = l.o.forward(&o, m);
    ops::add_assign(&mut x1, &x);
    let (n2, r2) = ops::rms_forward(&x1, &l.post_norm.w, h, d.eps);
    let (gate, xa_g) = l.gate.forward(&n2, m);
    let (up, xa_u) = l.up.forward(&n2, m);
    drop(n2);
    let a = ops::swiglu_forward(&gate, &up);
    let (mut x2, xa_d) = l.down.forward(&a, m);
    ops::add_assign(&mut x2, &x1);
    let saved = keep.then_some(Saved {
        x,
        r1,
        q_pre,
        k_pre,
        q,
        k,
        v,
        probs,
        o,
        x1,
        r2,
        gate,
        up,
        xa: [xa_q, xa_k, xa_v, xa_o, xa_g, xa_u, xa_d],
    });
    (x2, saved)
}

/// One layer backward: `g` holds the gradient of the layer's output on
/// entry and of its input on return; parameter gradients go to `grads`.
fn layer_backward<E: CpuFloat>(
    d: &Dims,
    l: &HostLayer<E>,
    c: &Consts<E>,
    sv: Saved<E>,
    g: &mut [E],
    grads: &mut Gradients<E, Cpu>,
    train_norms: bool,
) -> Result<(), CpuError>
where
    Cpu: Device<E>,
{
    let (m, h) = (d.m, d.hidden);
    let xa = |i: usize| sv.xa[i].as_ref();
    // MLP: x2 = x1 + down(swiglu(gate(n2), up(n2))), n2 = norm(x1)
    let a = ops::swiglu_forward(&sv.gate, &sv.up);
    let mut da = vec![E::zero(); a.len()];
    l.down.backward(grads, g, &a, xa(6), m, &mut da)?;
    drop(a);
    let (dgate, dup) = ops::swiglu_backward(&da, &sv.gate, &sv.up);
    drop(da);
    let (n2, _) = ops::rms_forward(&sv.x1, &l.post_norm.w, h, d.eps);
    let mut dn2 = vec![E::zero(); m * h];
    l.gate.backward(grads, &dgate, &n2, xa(4), m, &mut dn2)?;
    l.up.backward(grads, &dup, &n2, xa(5), m, &mut dn2)?;
    drop((n2, dgate, dup));
    l.post_norm
        .backward(grads, &dn2, &sv.x1, &sv.r2, h, g, train_norms)?;
    drop(dn2);
    // Attention: x1 = x + o_proj(attend(rope(q), rope(k), v)), of n1 = norm(x)
    let mut dao = vec![E::zero(); m * d.q_width()];
    l.o.backward(grads, g, &sv.o, xa(3), m, &mut dao)?;
    let (mut dq, mut dk, dv) = attention_backward(d, &sv, &dao);
    drop(dao);
    ops::rope_backward(&mut dq, &c.cos, &c.sin, d.heads, d.hd);
    ops::rope_backward(&mut dk, &c.cos, &c.sin, d.kv_heads, d.hd);
    for (grad, pre, norm) in [
        (&mut dq, &sv.q_pre, &l.q_norm),
        (&mut dk, &sv.k_pre, &l.k_norm),
    ] {
        if let (Some((x, inv)), Some(n)) = (pre, norm) {
            let mut dx = vec![E::zero(); x.len()];
            n.backward(grads, grad, x, inv, d.hd, &mut dx, train_norms)?;
            *grad = dx;
        }
    }
    let (n1, _) = ops::rms_forward(&sv.x, &l.input_norm.w, h, d.eps);
    let mut dn1 = vec![E::zero(); m * h];
    l.q.backward(grads, &dq, &n1, xa(0), m, &mut dn1)?;
    l.k.backward(grads, &dk, &n1, xa(1), m, &mut dn1)?;
    l.v.backward(grads, &dv, &n1, xa(2), m, &mut dn1)?;
    drop((n1, dq, dk, dv));
    l.input_norm
        .backward(grads, &dn1, &sv.x, &sv.r1, h, g, train_norms)
}

/// Every layer of `params`, then its final RMSNorm, over the embedded
/// tokens `x` (B, S, H) with the batch's constants `c`.
pub fn decoder<E, T>(
    x: T3<E, Cpu, T>,
    params: &LlamaParams<E, Cpu>,
    c: &Rope<E, Cpu>,
) -> T3<E, Cpu, T>
where
    E: CpuFloat,
    Cpu: Device<E>,
    T: Tape<E, Cpu> + Merge<T>,
{
    let shape = *x.shape();
    let (batch, seq, hidden) = shape;
    let cfg = &params.config;
    let d = Dims {
        batch,
        seq,
        m: batch * seq,
        hidden,
        heads: cfg.num_attention_heads,
        kv_heads: cfg.kv_heads(),
        hd: cfg.head_dim(),
        eps: cfg.rms_norm_eps,
    };
    assert_eq!(
        c.bias.shape().2,
        seq,
        "the decoder op attends within the batch"
    );
    let (x, mut tape) = x.reshape_like(&shape).split_tape();
    let consts = Consts {
        cos: host(&c.cos),
        sin: host(&c.sin),
        bias: host(&c.bias),
    };
    let keep = T::OWNS_TAPE;
    let mut cur = host(&x);
    let mut saved = Vec::with_capacity(if keep { params.layers.len() } else { 0 });
    for layer in &params.layers {
        let (next, sv) = layer_forward(&d, &HostLayer::load(layer), &consts, cur, keep);
        saved.extend(sv);
        cur = next;
    }
    let norm = Norm::load(&params.norm);
    let (y, inv) = ops::rms_forward(&cur, &norm.w, hidden, d.eps);
    let out = x.device().tensor_from_vec(y, shape);
    if keep {
        // The parameters' buffers are shared, not copied, until backward.
        let layers = params.layers.clone();
        let final_norm = params.norm.clone();
        let train_norms = !params.has_lora();
        let (x_id, out_id) = (x.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let gy = E::slice(grads.get_or_alloc_mut(&out_id)?).to_vec();
            let mut g = vec![E::zero(); gy.len()];
            let norm = Norm::load(&final_norm);
            norm.backward(grads, &gy, &cur, &inv, hidden, &mut g, train_norms)?;
            drop((gy, cur));
            for (layer, sv) in layers.iter().zip(saved).rev() {
                let l = HostLayer::load(layer);
                layer_backward(&d, &l, &consts, sv, &mut g, grads, train_norms)?;
            }
            ops::add_assign(E::slice(grads.get_or_alloc_mut(&x_id)?), &g);
            Ok(())
        });
    }
    out.put_tape(tape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Architecture;
    use crate::model::lora::dropout;
    use crate::model::{LlamaConfig, TokenBatch};

    type P = LlamaParams<f64, Cpu>;
    type Traced = T3<f64, Cpu, OwnedTape<f64, Cpu>>;

    fn config() -> LlamaConfig {
        crate::model::llama::tests::config(false)
    }

    /// Weights 10x the init (larger scores), norms and biases away from
    /// 1 and 0 (as the model's gradient checks have them), so that every
    /// gradient is well above rounding.
    fn model(cfg: &LlamaConfig, lora: bool) -> P {
        let mut p = crate::model::llama::tests::model_scaled(cfg, 10.0);
        if lora {
            crate::model::lora::tests::attach_every_target(&mut p);
        }
        p
    }

    /// The trainable parameters of the stack (not embeddings or heads).
    fn stack_params(p: &P) -> Vec<(String, &Matrix<f64, Cpu>)> {
        let mut v = p.trainable();
        v.retain(|(n, _)| n.contains("layers.") || n == "model.norm.weight");
        assert!(v.len() > 2);
        v
    }

    /// `sum(stack(x) * probe)` through `stack`, and its gradients for x
    /// and every trainable parameter.
    fn run(
        p: &P,
        batch: &TokenBatch,
        stack: &dyn Fn(Traced, &Rope<f64, Cpu>) -> Traced,
    ) -> (Vec<f64>, Vec<Vec<f64>>) {
        let dev = Cpu::default();
        let c = Rope::new(p, batch, &dev);
        let (b, s, h) = (batch.batch, batch.seq, p.config.hidden_size);
        let x: Vec<f64> = (0..b * s * h)
            .map(|i| ((i * 7) % 13) as f64 / 6.0 - 1.0)
            .collect();
        let x = dev.tensor_from_vec(x, (b, s, h));
        let probe: Vec<f64> = (0..b * s * h)
            .map(|i| ((i * 5) % 11) as f64 / 5.0 - 1.0)
            .collect();
        let probe = dev.tensor_from_vec(probe, (b, s, h));
        let out = stack(x.leaky_trace(), &c);
        let y = out.retaped::<NoneTape>().as_vec();
        let grads = (out * probe).sum().backward();
        let mut g = vec![grads.get(&x).as_vec()];
        g.extend(stack_params(p).iter().map(|(_, t)| grads.get(*t).as_vec()));
        (y, g)
    }

    fn check(cfg: &LlamaConfig, lora: bool) {
        check_model(&model(cfg, lora));
    }

    fn batch() -> TokenBatch {
        TokenBatch::right_padded(&[vec![1, 4, 2, 7, 3], vec![5, 9, 2]], 0)
    }

    /// Both stacks forward inside one LoRA dropout seed's scope (no effect
    /// without dropout), then backward.
    fn check_model(p: &P) {
        let batch = batch();
        let (y0, g0) = run(p, &batch, &|x, c| {
            dropout::scoped(7, || super::super::llama::decoder_layers(x, p, c))
        });
        let (y1, g1) = run(p, &batch, &|x, c| dropout::scoped(7, || decoder(x, p, c)));
        let close = |a: &[f64], b: &[f64], what: &str| {
            let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            assert!(scale > 1e-6, "{what}: no signal");
            for (i, (u, v)) in a.iter().zip(b).enumerate() {
                assert!((u - v).abs() <= 1e-10 * scale, "{what}[{i}]: {u} vs {v}");
            }
        };
        close(&y0, &y1, "output");
        let names: Vec<String> = std::iter::once("x".to_string())
            .chain(stack_params(p).into_iter().map(|(n, _)| n))
            .collect();
        for ((a, b), name) in g0.iter().zip(&g1).zip(&names) {
            close(a, b, name);
        }
    }

    #[test]
    fn equals_the_layer_by_layer_stack_llama_gqa() {
        check(&config(), false);
    }

    #[test]
    fn equals_the_layer_by_layer_stack_with_biases_and_llama3_rope() {
        check(
            &crate::model::llama::tests::with_biases_and_llama3_rope(config()),
            false,
        );
    }

    #[test]
    fn equals_the_layer_by_layer_stack_qwen2_and_qwen3() {
        let mut cfg = config();
        cfg.architecture = Architecture::Qwen2;
        check(&cfg, false);
        let mut cfg = config();
        cfg.architecture = Architecture::Qwen3;
        cfg.head_dim = Some(4);
        check(&cfg, false);
    }

    #[test]
    fn equals_the_layer_by_layer_stack_with_lora() {
        let mut cfg = config();
        cfg.attention_bias = true;
        cfg.mlp_bias = true;
        check(&cfg, true);
    }

    #[test]
    fn equals_the_layer_by_layer_stack_with_lora_dropout() {
        let mut cfg = config();
        cfg.mlp_bias = true;
        let mut p = model(&cfg, true);
        crate::model::lora::tests::set_dropout(&mut p, 0.4);
        check_model(&p);
        // Not vacuous: the masks change the output, and only inside a scope.
        let c = Rope::new(&p, &batch(), &Cpu::default());
        let x: Traced = Cpu::default()
            .ones_like(&(2, 5, cfg.hidden_size))
            .leaky_trace();
        let plain = decoder(x.retaped::<NoneTape>(), &p, &c).as_vec();
        let masked = dropout::scoped(7, || decoder(x.retaped::<NoneTape>(), &p, &c)).as_vec();
        assert_ne!(plain, masked);
        crate::model::lora::tests::set_dropout(&mut p, 0.0);
        let off = dropout::scoped(7, || decoder(x.retaped::<NoneTape>(), &p, &c)).as_vec();
        assert_eq!(plain, off);
    }
}
