//! The element-wise parts of a Llama layer as single ops: RMSNorm, SwiGLU,
//! rotary embeddings, attention's masked softmax, and the log-softmax +
//! gather of next-token log-probabilities.
//!
//! Built from dfdx's generic broadcasting ops, each of these is 3 to 8
//! passes over memory forward and as many backward, each with a zero-filled
//! gradient buffer; on the CPU that was about half of a training step
//! (profile in README.md). [`Kernels`] has one method per op: the CPU
//! implements them as fused loops with the backward written out, and any
//! other device (CUDA) keeps the default methods, the same maths in dfdx
//! ops ([`composite`]). Tests check the two against each other, forward and
//! backward, and the model's gradient check runs through the fused ones.

use dfdx::prelude::*;
use num_traits::Zero;

use super::gemm::{gemm, View};
use super::host_ops::{self as ops, lanes};
use super::llama::{Rope, T2, T3};
use super::params::Matrix;
use super::LlamaParams;

pub type T4<E, D, T> = Tensor<(usize, usize, usize, usize), E, D, T>;

/// The model's fused ops; a device implements what it can fuse.
pub trait Kernels<E: Dtype + From<f32>>: Device<E> {
    /// x (B, S, K) @ w^T for a weight w (N, K): (B, S, N). `frozen` (LoRA's
    /// base weights): the gradient flows to x only, and none is computed
    /// or stored for w.
    fn linear<T: Tape<E, Self> + Merge<T>>(
        x: T3<E, Self, T>,
        w: &Matrix<E, Self>,
        frozen: bool,
    ) -> T3<E, Self, T> {
        composite::linear(x, w, frozen)
    }

    /// Run `f` (inference on `params`: no tape) with the weights' host
    /// copies made once instead of at every [`Kernels::linear`]: the CPU
    /// can only read a dfdx tensor by copying it, which at one generated
    /// token per step is most of the step. Other devices run `f` as it is.
    fn with_weights_cached<R>(params: &LlamaParams<E, Self>, f: impl FnOnce() -> R) -> R {
        let _ = params;
        f()
    }

    /// Every decoder layer of `params`, then the final RMSNorm, over the
    /// embedded tokens x (B, S, H) with the batch's constants `c`. The CPU
    /// runs the whole stack as one op (`model::decoder`).
    fn decoder<T: Tape<E, Self> + Merge<T> + Merge<NoneTape>>(
        x: T3<E, Self, T>,
        params: &LlamaParams<E, Self>,
        c: &Rope<E, Self>,
    ) -> T3<E, Self, T> {
        super::llama::decoder_layers(x, params, c)
    }

    /// RMSNorm over the last axis with a (1, H) weight:
    /// `x / sqrt(mean(x^2) + eps) * w`.
    fn rms_norm<T: Tape<E, Self> + Merge<T>>(
        x: T3<E, Self, T>,
        w: &Matrix<E, Self>,
        eps: f64,
    ) -> T3<E, Self, T> {
        composite::rms_norm(x, w, eps)
    }

    /// The SwiGLU gate: `silu(gate) * up`.
    fn swiglu<T: Tape<E, Self> + Merge<T>>(
        gate: T3<E, Self, T>,
        up: T3<E, Self, T>,
    ) -> T3<E, Self, T> {
        composite::swiglu(gate, up)
    }

    /// Rotary embedding (Hugging Face rotate_half) of q or k laid out
    /// (B, S, heads, head_dim), with the batch's cos/sin tables.
    fn rope<T: Tape<E, Self> + Merge<T> + Merge<NoneTape>>(
        x: T4<E, Self, T>,
        c: &Rope<E, Self>,
    ) -> T4<E, Self, T> {
        composite::rope(x, c)
    }

    /// `softmax(scores * scale + bias)` over the last axis; scores are
    /// (B, heads, Sq, Sk), the bias (B, Sq, Sk) is shared by the heads.
    fn masked_softmax<T: Tape<E, Self> + Merge<T> + Merge<NoneTape>>(
        scores: T4<E, Self, T>,
        scale: f64,
        c: &Rope<E, Self>,
    ) -> T4<E, Self, T> {
        composite::masked_softmax(scores, scale, c)
    }

    /// `log_softmax(h w^T)[b, s, targets[b * S + s]]`: (B, S), the LM head
    /// and its log-probabilities as one op (`frozen`: no gradient for w).
    /// The CPU runs it in chunks of rows, so the (B·S, vocab) logits never
    /// exist at once (49,152 wide for SmolLM2).
    fn lm_head_logprobs<T: Tape<E, Self> + Merge<T> + Merge<NoneTape>>(
        h: T3<E, Self, T>,
        w: &Matrix<E, Self>,
        frozen: bool,
        targets: &[usize],
    ) -> T2<E, Self, T> {
        Self::gather_logprobs(Self::linear(h, w, frozen), targets)
    }

    /// `log_softmax(logits)[b, s, targets[b * S + s]]`: (B, S).
    fn gather_logprobs<T: Tape<E, Self> + Merge<T> + Merge<NoneTape>>(
        logits: T3<E, Self, T>,
        targets: &[usize],
    ) -> T2<E, Self, T> {
        composite::gather_logprobs(logits, targets)
    }
}

#[cfg(feature = "cuda")]
impl<E: Dtype + From<f32>> Kernels<E> for dfdx::tensor::Cuda where dfdx::tensor::Cuda: Device<E> {}

/// The ops in dfdx's generic tensor ops, for any device.
pub mod composite {
    use super::*;

    /// As one (B·S, K) x (K, N) product: dfdx's batched-by-broadcast matmul
    /// runs one GEMM per batch row, each streaming the whole weight.
    /// A frozen w enters untaped, so dfdx records no gradient for it.
    pub fn linear<E: Dtype, D: Device<E>, T: Tape<E, D> + Merge<T>>(
        x: T3<E, D, T>,
        w: &Matrix<E, D>,
        frozen: bool,
    ) -> T3<E, D, T> {
        let (b, s, k) = *x.shape();
        let n = w.shape().0;
        let x = x.reshape_like(&(b * s, k));
        let y = if frozen {
            x.matmul(w.clone().permute::<_, Axes2<1, 0>>())
        } else {
            x.matmul(w.retaped::<T>().permute::<_, Axes2<1, 0>>())
        };
        y.reshape_like(&(b, s, n))
    }

    pub fn rms_norm<E: Dtype + From<f32>, D: Device<E>, T: Tape<E, D> + Merge<T>>(
        x: T3<E, D, T>,
        w: &Matrix<E, D>,
        eps: f64,
    ) -> T3<E, D, T> {
        let shape = *x.shape();
        let var = x.retaped::<T>().square().mean::<(usize, usize), Axis<2>>();
        let inv = (var + E::from(eps as f32)).sqrt().recip();
        let weight = w
            .retaped::<T>()
            .reshape_like(&(shape.2,))
            .broadcast_like::<_, Axes2<0, 1>>(&shape);
        x * inv.broadcast_like::<_, Axis<2>>(&shape) * weight
    }

    pub fn swiglu<E: Dtype, D: Device<E>, T: Tape<E, D> + Merge<T>>(
        gate: T3<E, D, T>,
        up: T3<E, D, T>,
    ) -> T3<E, D, T> {
        // SiLU(g) = g * sigmoid(g); dfdx has no silu op.
        let silu = gate.retaped::<T>() * gate.sigmoid();
        silu * up
    }

    pub fn rope<E: Dtype, D: Device<E>, T: Tape<E, D> + Merge<T> + Merge<NoneTape>>(
        x: T4<E, D, T>,
        c: &Rope<E, D>,
    ) -> T4<E, D, T> {
        let shape = *x.shape();
        let (b, s, n, hd) = shape;
        // rotate_half as a matmul, so no slice backward is involved.
        let rotated = x
            .retaped::<T>()
            .reshape_like(&(b * s * n, hd))
            .matmul(c.rotate.clone())
            .reshape_like(&shape);
        let cos = c.cos.clone().broadcast_like::<_, Axis<2>>(&shape);
        let sin = c.sin.clone().broadcast_like::<_, Axis<2>>(&shape);
        x * cos + rotated * sin
    }

    pub fn masked_softmax<E: Dtype + From<f32>, D: Device<E>, T>(
        scores: T4<E, D, T>,
        scale: f64,
        c: &Rope<E, D>,
    ) -> T4<E, D, T>
    where
        T: Tape<E, D> + Merge<T> + Merge<NoneTape>,
    {
        let shape = *scores.shape();
        let bias = c.bias.clone().broadcast_like::<_, Axis<1>>(&shape);
        ((scores * E::from(scale as f32)) + bias).softmax::<Axis<3>>()
    }

    pub fn gather_logprobs<E: Dtype, D: Device<E>, T>(
        logits: T3<E, D, T>,
        targets: &[usize],
    ) -> T2<E, D, T>
    where
        T: Tape<E, D> + Merge<T> + Merge<NoneTape>,
    {
        let (b, s, _) = *logits.shape();
        let dev = logits.device().clone();
        logits
            .log_softmax::<Axis<2>>()
            .select(dev.tensor_from_vec(targets.to_vec(), (b, s)))
    }
}

fn constant<E: From<f32>>(x: f64) -> E {
    <E as From<f32>>::from(x as f32)
}

/// Host copies of a borrowed model's matrices, keyed by each matrix's
/// address, while [`Kernels::with_weights_cached`] runs on this thread.
/// A hit is sound: the model stays borrowed for the whole scope, so a live
/// matrix at a cached address is the very matrix that was copied.
mod weight_cache {
    use std::any::Any;
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::rc::Rc;

    thread_local! {
        static CACHE: RefCell<Option<HashMap<usize, Rc<dyn Any>>>> = const { RefCell::new(None) };
    }

    /// Fill the cache for the scope of `f`, then empty it (also on a panic).
    pub fn scoped<R>(entries: Vec<(usize, Rc<dyn Any>)>, f: impl FnOnce() -> R) -> R {
        struct Clear;
        impl Drop for Clear {
            fn drop(&mut self) {
                CACHE.with(|c| *c.borrow_mut() = None);
            }
        }
        if CACHE.with(|c| c.borrow().is_some()) {
            return f(); // nested: the outer scope's copies serve
        }
        CACHE.with(|c| *c.borrow_mut() = Some(entries.into_iter().collect()));
        let _clear = Clear;
        f()
    }

    /// A weight's elements on the host: the cached copy when inference
    /// (`taped` false) runs inside a scope that holds one, else a copy.
    pub enum HostWeight<E> {
        Cached(Rc<Vec<E>>),
        Copied(Vec<E>),
    }

    impl<E> std::ops::Deref for HostWeight<E> {
        type Target = [E];
        fn deref(&self) -> &[E] {
            match self {
                HostWeight::Cached(v) => v,
                HostWeight::Copied(v) => v,
            }
        }
    }

    impl<E: Clone> HostWeight<E> {
        /// The elements as an owned vector (no copy for `Copied`).
        pub fn into_vec(self) -> Vec<E> {
            match self {
                HostWeight::Cached(v) => v.as_ref().clone(),
                HostWeight::Copied(v) => v,
            }
        }
    }

    pub fn host_weight<E: 'static>(
        address: usize,
        taped: bool,
        copy: impl FnOnce() -> Vec<E>,
    ) -> HostWeight<E> {
        match get::<E>(address).filter(|_| !taped) {
            Some(c) => HostWeight::Cached(c),
            None => HostWeight::Copied(copy()),
        }
    }

    fn get<E: 'static>(address: usize) -> Option<Rc<Vec<E>>> {
        CACHE.with(|c| {
            let c = c.borrow();
            let hit = c.as_ref()?.get(&address)?.clone();
            hit.downcast::<Vec<E>>().ok()
        })
    }
}

/// The fused CPU kernels, for f32 (training, with [`fast_exp`]) and f64
/// (gradient checks, with std's exp).
/// Inputs are made contiguous first (a view when they already are), so
/// logical and buffer order agree for gradients too.
macro_rules! cpu_kernels {
    ($module:ident, $dtype:ty, $exp:expr) => {
        mod $module {
            use super::*;

            type E = $dtype;

            fn exp(x: E) -> E {
                $exp(x)
            }

            /// `w`'s elements on the host: [`weight_cache::host_weight`].
            fn host_weight(w: &Matrix<E, Cpu>, taped: bool) -> weight_cache::HostWeight<E> {
                let address = w as *const Matrix<E, Cpu> as usize;
                weight_cache::host_weight(address, taped, || host(w))
            }

            /// x w^T through [`gemm`]; with `train_w` false no gradient for w.
            fn linear_fused<T: Tape<E, Cpu> + Merge<T>>(
                x: T3<E, Cpu, T>,
                w: &Matrix<E, Cpu>,
                train_w: bool,
            ) -> T3<E, Cpu, T> {
                let shape = *x.shape();
                let (b, s, k) = shape;
                let (n, m) = (w.shape().0, b * s);
                let (x, mut tape) = x.reshape_like(&shape).split_tape();
                let mut y = vec![E::zero(); m * n];
                {
                    let ws = host_weight(w, T::OWNS_TAPE);
                    let xs = host(&x);
                    let (xv, wt) = (View::row_major(&xs, k), View::transposed(&ws, k));
                    gemm(m, n, k, xv, wt, &mut y, false);
                }
                let out = x.device().tensor_from_vec(y, (b, s, n));
                if T::OWNS_TAPE {
                    let (x_id, w_id, out_id) = (x.ghost(), w.ghost(), out.ghost());
                    // The inputs' buffers (shared, not copied) until backward.
                    let w = w.clone();
                    tape.add_backward_op(move |grads| {
                        let g = grads.get_or_alloc_mut(&out_id)?.to_vec();
                        let ws = host(&w);
                        let gv = View::row_major(&g, n);
                        // dx (M, K) += g (M, N) w (N, K)
                        let gx = grads.get_or_alloc_mut(&x_id)?;
                        gemm(m, k, n, gv, View::row_major(&ws, k), gx, true);
                        if train_w {
                            // dw (N, K) += g^T (N, M) x (M, K)
                            let gw = grads.get_or_alloc_mut(&w_id)?;
                            let (gt, xs) = (View::transposed(&g, n), host(&x));
                            gemm(n, k, m, gt, View::row_major(&xs, k), gw, true);
                        }
                        Ok(())
                    });
                }
                out.put_tape(tape)
            }

            /// Rows of logits computed at once by [`lm_head_fused`]: each
            /// chunk packs the whole head again (49,152 x 576 for SmolLM2), so
            /// not too few; a chunk's logits are rows x vocab floats.
            const LM_HEAD_ROWS: usize = 256;

            /// log_softmax(h w^T)[targets] chunk by chunk; the backward
            /// recomputes each chunk's logits from h (one more LM-head
            /// product) instead of keeping them.
            fn lm_head_fused<T: Tape<E, Cpu> + Merge<T> + Merge<NoneTape>>(
                h: T3<E, Cpu, T>,
                w: &Matrix<E, Cpu>,
                train_w: bool,
                targets: &[usize],
            ) -> T2<E, Cpu, T> {
                let shape = *h.shape();
                let (b, s, k) = shape;
                let (v, m) = (w.shape().0, b * s);
                assert_eq!(targets.len(), m, "one target per position");
                let (h, mut tape) = h.reshape_like(&shape).split_tape();
                let hs = host(&h);
                // Under a tape always a copy (HostWeight::Copied), which the
                // backward then owns.
                let ws = host_weight(w, T::OWNS_TAPE);
                let mut buf = vec![E::zero(); LM_HEAD_ROWS.min(m) * v];
                let (mut out, mut lse) = (Vec::with_capacity(m), Vec::with_capacity(m));
                for r0 in (0..m).step_by(LM_HEAD_ROWS) {
                    let rows = LM_HEAD_ROWS.min(m - r0);
                    let chunk = &mut buf[..rows * v];
                    let hc = View::row_major(&hs[r0 * k..(r0 + rows) * k], k);
                    gemm(rows, v, k, hc, View::transposed(&ws, k), chunk, false);
                    for (row, &t) in chunk.chunks_exact_mut(v).zip(&targets[r0..r0 + rows]) {
                        let max = lanes::max(row);
                        let target = row[t];
                        row.iter_mut().for_each(|x| *x = exp(*x - max));
                        let l = max + lanes::sum(row).ln();
                        lse.push(l);
                        out.push(target - l);
                    }
                }
                drop(buf);
                let out = h.device().tensor_from_vec(out, (b, s));
                if T::OWNS_TAPE {
                    let targets = targets.to_vec();
                    let ws: Vec<E> = ws.into_vec();
                    let (h_id, w_id, out_id) = (h.ghost(), w.ghost(), out.ghost());
                    tape.add_backward_op(move |grads| {
                        let g = grads.get_or_alloc_mut(&out_id)?.to_vec();
                        let mut buf = vec![E::zero(); LM_HEAD_ROWS.min(m) * v];
                        for r0 in (0..m).step_by(LM_HEAD_ROWS) {
                            let rows = LM_HEAD_ROWS.min(m - r0);
                            let gs = &g[r0..r0 + rows];
                            if gs.iter().all(|x| *x == E::zero()) {
                                continue; // untrained positions (prompt, padding)
                            }
                            let chunk = &mut buf[..rows * v];
                            let hc = &hs[r0 * k..(r0 + rows) * k];
                            let hv = View::row_major(hc, k);
                            gemm(rows, v, k, hv, View::transposed(&ws, k), chunk, false);
                            for (i, row) in chunk.chunks_exact_mut(v).enumerate() {
                                let (gi, l) = (gs[i], lse[r0 + i]);
                                // d logit_j = g (1[j = t] - softmax_j)
                                if gi == E::zero() {
                                    row.fill(E::zero());
                                    continue;
                                }
                                row.iter_mut().for_each(|x| *x = -gi * exp(*x - l));
                                row[targets[r0 + i]] += gi;
                            }
                            let dl = View::row_major(&*chunk, v);
                            let gh = grads.get_or_alloc_mut(&h_id)?;
                            let ghc = &mut gh[r0 * k..(r0 + rows) * k];
                            gemm(rows, k, v, dl, View::row_major(&ws, k), ghc, true);
                            if train_w {
                                let gw = grads.get_or_alloc_mut(&w_id)?;
                                gemm(v, k, rows, View::transposed(&*chunk, v), hv, gw, true);
                            }
                        }
                        Ok(())
                    });
                }
                out.put_tape(tape)
            }

            impl Kernels<E> for Cpu {
                fn lm_head_logprobs<T: Tape<E, Self> + Merge<T> + Merge<NoneTape>>(
                    h: T3<E, Self, T>,
                    w: &Matrix<E, Self>,
                    frozen: bool,
                    targets: &[usize],
                ) -> T2<E, Self, T> {
                    lm_head_fused(h, w, !frozen, targets)
                }

                fn with_weights_cached<R>(
                    params: &LlamaParams<E, Cpu>,
                    f: impl FnOnce() -> R,
                ) -> R {
                    let entries = params
                        .named()
                        .into_iter()
                        .filter(|(_, t)| t.shape().0 > 1)
                        .map(|(_, t)| {
                            let copy: std::rc::Rc<dyn std::any::Any> = std::rc::Rc::new(host(t));
                            (t as *const Matrix<E, Cpu> as usize, copy)
                        })
                        .collect();
                    weight_cache::scoped(entries, f)
                }

                fn linear<T: Tape<E, Self> + Merge<T>>(
                    x: T3<E, Self, T>,
                    w: &Matrix<E, Self>,
                    frozen: bool,
                ) -> T3<E, Self, T> {
                    linear_fused(x, w, !frozen)
                }

                fn decoder<T: Tape<E, Self> + Merge<T> + Merge<NoneTape>>(
                    x: T3<E, Self, T>,
                    params: &LlamaParams<E, Self>,
                    c: &Rope<E, Self>,
                ) -> T3<E, Self, T> {
                    super::super::decoder::decoder(x, params, c)
                }

                fn rms_norm<T: Tape<E, Self> + Merge<T>>(
                    x: T3<E, Self, T>,
                    w: &Matrix<E, Self>,
                    eps: f64,
                ) -> T3<E, Self, T> {
                    let shape = *x.shape();
                    let h = shape.2;
                    let (x, mut tape) = x.reshape_like(&shape).split_tape();
                    let xs = host(&x);
                    let ws = host(w);
                    let (y, inv) = ops::rms_forward(&xs, &ws, h, eps);
                    let out = x.device().tensor_from_vec(y, shape);
                    if T::OWNS_TAPE {
                        let (x_id, w_id, out_id) = (x.ghost(), w.ghost(), out.ghost());
                        tape.add_backward_op(move |grads| {
                            let g = grads.get_or_alloc_mut(&out_id)?.to_vec();
                            let mut gw = vec![E::zero(); h];
                            let gx = grads.get_or_alloc_mut(&x_id)?;
                            ops::rms_backward(&g, &xs, &inv, &ws, h, gx, Some(&mut gw));
                            ops::add_assign(grads.get_or_alloc_mut(&w_id)?, &gw);
                            Ok(())
                        });
                    }
                    out.put_tape(tape)
                }

                fn swiglu<T: Tape<E, Self> + Merge<T>>(
                    gate: T3<E, Self, T>,
                    up: T3<E, Self, T>,
                ) -> T3<E, Self, T> {
                    let shape = *gate.shape();
                    let (gate, gate_tape) = gate.reshape_like(&shape).split_tape();
                    let (up, up_tape) = up.reshape_like(&shape).split_tape();
                    let mut tape = gate_tape.merge(up_tape);
                    let (gs, us) = (host(&gate), host(&up));
                    let y = ops::swiglu_forward(&gs, &us);
                    let out = gate.device().tensor_from_vec(y, shape);
                    if T::OWNS_TAPE {
                        let (gate_id, up_id, out_id) = (gate.ghost(), up.ghost(), out.ghost());
                        tape.add_backward_op(move |grads| {
                            let g = grads.get_or_alloc_mut(&out_id)?.to_vec();
                            let (dg, du) = ops::swiglu_backward(&g, &gs, &us);
                            ops::add_assign(grads.get_or_alloc_mut(&gate_id)?, &dg);
                            ops::add_assign(grads.get_or_alloc_mut(&up_id)?, &du);
                            Ok(())
                        });
                    }
                    out.put_tape(tape)
                }

                fn rope<T: Tape<E, Self> + Merge<T> + Merge<NoneTape>>(
                    x: T4<E, Self, T>,
                    c: &Rope<E, Self>,
                ) -> T4<E, Self, T> {
                    let shape = *x.shape();
                    let (_, _, n, hd) = shape;
                    let (x, mut tape) = x.reshape_like(&shape).split_tape();
                    let mut y = host(&x);
                    let (cos, sin) = (host(&c.cos), host(&c.sin));
                    ops::rope_forward(&mut y, &cos, &sin, n, hd);
                    let out = x.device().tensor_from_vec(y, shape);
                    if T::OWNS_TAPE {
                        let (x_id, out_id) = (x.ghost(), out.ghost());
                        tape.add_backward_op(move |grads| {
                            let mut g = grads.get_or_alloc_mut(&out_id)?.to_vec();
                            ops::rope_backward(&mut g, &cos, &sin, n, hd);
                            ops::add_assign(grads.get_or_alloc_mut(&x_id)?, &g);
                            Ok(())
                        });
                    }
                    out.put_tape(tape)
                }

                fn masked_softmax<T: Tape<E, Self> + Merge<T> + Merge<NoneTape>>(
                    scores: T4<E, Self, T>,
                    scale: f64,
                    c: &Rope<E, Self>,
                ) -> T4<E, Self, T> {
                    let shape = *scores.shape();
                    let (_, heads, sq, sk) = shape;
                    let (scores, mut tape) = scores.reshape_like(&shape).split_tape();
                    let xs = host(&scores);
                    let bias = host(&c.bias);
                    let scale = constant::<E>(scale);
                    let mut p = Vec::with_capacity(xs.len());
                    for (i, row) in xs.chunks_exact(sk).enumerate() {
                        // Row i is (batch, head, query); the bias row is (batch, query).
                        let (batch, query) = (i / (heads * sq), i % sq);
                        let at = (batch * sq + query) * sk;
                        let brow = &bias[at..at + sk];
                        // A masked key (bias -1e9) underflows to exactly 0.
                        let start = p.len();
                        p.extend(row.iter().zip(brow).map(|(&x, &b)| x * scale + b));
                        ops::softmax_in_place(&mut p[start..]);
                    }
                    let kept = if T::OWNS_TAPE { p.clone() } else { Vec::new() };
                    let out = scores.device().tensor_from_vec(p, shape);
                    if T::OWNS_TAPE {
                        let (x_id, out_id) = (scores.ghost(), out.ghost());
                        tape.add_backward_op(move |grads| {
                            let g = grads.get_or_alloc_mut(&out_id)?.to_vec();
                            let gx = grads.get_or_alloc_mut(&x_id)?;
                            let rows = kept.chunks_exact(sk).zip(g.chunks_exact(sk));
                            let mut d = vec![E::zero(); sk];
                            for ((pr, gr), gxr) in rows.zip(gx.chunks_exact_mut(sk)) {
                                d.copy_from_slice(gr);
                                ops::softmax_backward_in_place(&mut d, pr, scale);
                                ops::add_assign(gxr, &d);
                            }
                            Ok(())
                        });
                    }
                    out.put_tape(tape)
                }

                fn gather_logprobs<T: Tape<E, Self> + Merge<T> + Merge<NoneTape>>(
                    logits: T3<E, Self, T>,
                    targets: &[usize],
                ) -> T2<E, Self, T> {
                    let shape = *logits.shape();
                    let (b, s, v) = shape;
                    assert_eq!(targets.len(), b * s, "one target per position");
                    let (logits, mut tape) = logits.reshape_like(&shape).split_tape();
                    // With a tape the buffer becomes the softmax, for the backward.
                    let mut ls = host(&logits);
                    let mut out = Vec::with_capacity(b * s);
                    for (row, &t) in ls.chunks_exact_mut(v).zip(targets) {
                        let max = lanes::max(row);
                        let target = row[t];
                        row.iter_mut().for_each(|x| *x = exp(*x - max));
                        let sum = lanes::sum(row);
                        out.push(target - max - sum.ln());
                        if T::OWNS_TAPE {
                            let inv = sum.recip();
                            row.iter_mut().for_each(|x| *x *= inv);
                        }
                    }
                    let out = logits.device().tensor_from_vec(out, (b, s));
                    if T::OWNS_TAPE {
                        let targets = targets.to_vec();
                        let (x_id, out_id) = (logits.ghost(), out.ghost());
                        tape.add_backward_op(move |grads| {
                            let g = grads.get_or_alloc_mut(&out_id)?.to_vec();
                            let gx = grads.get_or_alloc_mut(&x_id)?;
                            let rows = ls.chunks_exact(v).zip(gx.chunks_exact_mut(v));
                            for (i, (softmax, gr)) in rows.enumerate() {
                                // d logit_j = g (1[j = t] - softmax_j)
                                if g[i] == E::zero() {
                                    continue;
                                }
                                for (d, &p) in gr.iter_mut().zip(softmax) {
                                    *d -= g[i] * p;
                                }
                                gr[targets[i]] += g[i];
                            }
                            Ok(())
                        });
                    }
                    out.put_tape(tape)
                }
            }
        }
    };
}

cpu_kernels!(cpu_f32, f32, fast_exp);
cpu_kernels!(cpu_f64, f64, f64::exp);

/// The elements of a contiguous CPU tensor: a memcpy of its buffer.
pub(crate) fn host<S: Shape, E: Dtype + Zero, T>(t: &Tensor<S, E, Cpu, T>) -> Vec<E>
where
    Cpu: CopySlice<E>,
{
    let mut v = vec![E::zero(); t.shape().num_elements()];
    t.copy_into(&mut v);
    v
}

/// e^x in f32 to within 2 ulp, as Cephes' expf computes it (x = n ln 2 + r,
/// a degree-5 polynomial for e^r, 2^n from the exponent bits), in plain
/// arithmetic so that loops over it vectorize: std's `exp` is a call per
/// element, and was 8% of a training step. Below -87.33 it is 0 (std
/// gives denormals down to -103), above 88.37 it saturates at 2^127.
pub fn fast_exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    let below = x < -87.33;
    let x = x.clamp(-87.33, 88.37);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HIGH - n * LN2_LOW;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    let e = (p * r * r + r + 1.0) * scale;
    if below {
        0.0
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LlamaConfig, LlamaParams, TokenBatch};

    type Traced<S> = Tensor<S, f64, Cpu, OwnedTape<f64, Cpu>>;
    type Op<'a, S, O> = &'a dyn Fn(Vec<Traced<S>>) -> Traced<O>;

    /// The fused and composite op agree on the output and on the gradients
    /// of `sum(out * probe)` for every input and for the `leaves` (weights).
    fn check<S: Shape, O: Shape>(
        what: &str,
        inputs: &[&Tensor<S, f64, Cpu>],
        leaves: &[&Matrix<f64, Cpu>],
        probe: &Tensor<O, f64, Cpu>,
        fused: Op<S, O>,
        composite: Op<S, O>,
    ) {
        let eval = |op: Op<S, O>| {
            let traced = inputs.iter().map(|t| t.trace(Gradients::leaky())).collect();
            let out = op(traced);
            let values = out.as_vec();
            let grads = (out * probe.clone()).sum().backward();
            let mut all: Vec<Vec<f64>> = inputs.iter().map(|t| grads.get(*t).as_vec()).collect();
            all.extend(leaves.iter().map(|t| grads.get(*t).as_vec()));
            (values, all)
        };
        let (out, grads) = eval(fused);
        let (want, want_grads) = eval(composite);
        close(&out, &want, &format!("{what}: output"));
        for (i, (g, w)) in grads.iter().zip(&want_grads).enumerate() {
            close(g, w, &format!("{what}: gradient {i}"));
        }
        assert!(
            grads.iter().flatten().any(|g| *g != 0.0),
            "{what}: gradients flow"
        );
    }

    fn close(a: &[f64], b: &[f64], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-10 * (1.0 + x.abs().max(y.abs())),
                "{what}[{i}]: fused {x} vs composite {y}"
            );
        }
    }

    /// Constants for 2 rows of 4 tokens, the second left-padded by 2 (its
    /// first two queries see no key at all); head_dim 4.
    fn constants(dev: &Cpu) -> Rope<f64, Cpu> {
        let cfg = LlamaConfig::tiny(11, 8, 1, 2, 1);
        let p = LlamaParams::<f64, Cpu>::init(&cfg, false, 0, dev);
        let b = TokenBatch::left_padded(&[vec![1, 2, 3, 4], vec![5, 6]], 0);
        let mut visible = Vec::new();
        for row in 0..2 {
            for i in 0..4 {
                for j in 0..4 {
                    visible.push(j <= i && b.mask[row * 4 + j]);
                }
            }
        }
        Rope::from_parts(&p, 2, 4, &b.positions(), &visible, 4, dev)
    }

    #[test]
    fn fast_exp_is_within_two_ulp_of_std() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (got, want) = (fast_exp(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(fast_exp(0.0), 1.0);
        assert_eq!(fast_exp(-87.4), 0.0);
        assert_eq!(fast_exp(-1e9), 0.0, "masked attention scores");
        assert!(fast_exp(1e9).is_finite());
    }

    #[test]
    fn rms_norm_matches_composite() {
        let dev = Cpu::seed_from_u64(1);
        let x = dev.sample_normal_like(&(2, 3, 8));
        let w: Matrix<f64, Cpu> = dev.sample_normal_like(&(1, 8));
        let probe = dev.sample_normal_like(&(2, 3, 8));
        check(
            "rms_norm",
            &[&x],
            &[&w],
            &probe,
            &|mut v| Cpu::rms_norm(v.remove(0), &w, 1e-5),
            &|mut v| composite::rms_norm(v.remove(0), &w, 1e-5),
        );
    }

    #[test]
    fn linear_matches_composite() {
        // Shapes past one micro-tile and one k-block, with ragged edges.
        let dev = Cpu::seed_from_u64(9);
        for (b, s, k, n) in [(2, 3, 5, 4), (3, 7, 300, 45)] {
            let x = dev.sample_normal_like(&(b, s, k));
            let w: Matrix<f64, Cpu> = dev.sample_normal_like(&(n, k));
            let probe = dev.sample_normal_like(&(b, s, n));
            check(
                "linear",
                &[&x],
                &[&w],
                &probe,
                &|mut v| Cpu::linear(v.remove(0), &w, false),
                &|mut v| composite::linear(v.remove(0), &w, false),
            );
        }
    }

    #[test]
    fn frozen_linear_matches_composite_and_leaves_the_weight_alone() {
        let dev = Cpu::seed_from_u64(10);
        let x = dev.sample_normal_like(&(2, 5, 40));
        let w: Matrix<f64, Cpu> = dev.sample_normal_like(&(33, 40));
        let probe = dev.sample_normal_like(&(2, 5, 33));
        check(
            "linear_frozen",
            &[&x],
            &[],
            &probe,
            &|mut v| Cpu::linear(v.remove(0), &w, true),
            &|mut v| composite::linear(v.remove(0), &w, true),
        );
        let out = Cpu::linear(x.trace(Gradients::leaky()), &w, true);
        let mut grads = (out * probe.clone()).sum().backward();
        // Allocates zeros only where no gradient was written.
        grads.try_alloc_for(&w).unwrap();
        assert!(
            grads.get(&w).as_vec().iter().all(|g| *g == 0.0),
            "no gradient for w"
        );
    }

    #[test]
    fn lm_head_logprobs_matches_composite_across_chunks() {
        // 3 x 50 = 150 positions: two chunks of rows, the second ragged.
        let dev = Cpu::seed_from_u64(11);
        let (b, s, k, v) = (3, 50, 8, 37);
        let h = dev.sample_normal_like(&(b, s, k));
        let w: Matrix<f64, Cpu> = dev.sample_normal_like(&(v, k));
        let targets: Vec<usize> = (0..b * s).map(|i| (i * 7 + 3) % v).collect();
        // Some positions untrained (weight 0), as prompts and padding are.
        let probe_values: Vec<f64> = (0..b * s)
            .map(|i| {
                if i % 5 == 0 {
                    0.0
                } else {
                    1.0 + (i % 3) as f64
                }
            })
            .collect();
        let probe = dev.tensor_from_vec(probe_values, (b, s));
        for frozen in [false, true] {
            let leaves: &[&Matrix<f64, Cpu>] = if frozen { &[] } else { &[&w] };
            check(
                "lm_head_logprobs",
                &[&h],
                leaves,
                &probe,
                &|mut v| Cpu::lm_head_logprobs(v.remove(0), &w, frozen, &targets),
                &|mut v| {
                    let logits = composite::linear(v.remove(0), &w, frozen);
                    composite::gather_logprobs(logits, &targets)
                },
            );
        }
    }

    #[test]
    fn swiglu_matches_composite() {
        let dev = Cpu::seed_from_u64(2);
        let gate = dev.sample_normal_like(&(2, 3, 5));
        let up = dev.sample_normal_like(&(2, 3, 5));
        let probe = dev.sample_normal_like(&(2, 3, 5));
        check(
            "swiglu",
            &[&gate, &up],
            &[],
            &probe,
            &|v| {
                let [gate, up] = <[_; 2]>::try_from(v).ok().unwrap();
                Cpu::swiglu(gate, up)
            },
            &|v| {
                let [gate, up] = <[_; 2]>::try_from(v).ok().unwrap();
                composite::swiglu(gate, up)
            },
        );
    }

    #[test]
    fn rope_matches_composite() {
        let dev = Cpu::seed_from_u64(3);
        let c = constants(&dev);
        let x = dev.sample_normal_like(&(2, 4, 3, 4));
        let probe = dev.sample_normal_like(&(2, 4, 3, 4));
        check(
            "rope",
            &[&x],
            &[],
            &probe,
            &|mut v| Cpu::rope(v.remove(0), &c),
            &|mut v| composite::rope(v.remove(0), &c),
        );
    }

    #[test]
    fn masked_softmax_matches_composite() {
        let dev = Cpu::seed_from_u64(4);
        let c = constants(&dev);
        let scores = dev.sample_normal_like(&(2, 3, 4, 4));
        let probe = dev.sample_normal_like(&(2, 3, 4, 4));
        check(
            "masked_softmax",
            &[&scores],
            &[],
            &probe,
            &|mut v| Cpu::masked_softmax(v.remove(0), 0.5, &c),
            &|mut v| composite::masked_softmax(v.remove(0), 0.5, &c),
        );
        // Masked keys get probability 0; each row sums to 1.
        let p = Cpu::masked_softmax(scores.clone(), 0.5, &c).as_vec();
        let bias = c.bias.as_vec();
        for (i, row) in p.chunks(4).enumerate() {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            let at = ((i / 12) * 4 + i % 4) * 4;
            let seen = bias[at..at + 4].contains(&0.0);
            for (k, q) in row.iter().enumerate() {
                if seen && bias[at + k] != 0.0 {
                    assert_eq!(*q, 0.0, "row {i} key {k}");
                }
            }
        }
    }

    #[test]
    fn gather_logprobs_matches_composite() {
        let dev = Cpu::seed_from_u64(5);
        let logits = dev.sample_normal_like(&(2, 3, 7));
        let probe = dev.sample_normal_like(&(2, 3));
        let targets = [0, 6, 3, 3, 1, 5];
        check(
            "gather_logprobs",
            &[&logits],
            &[],
            &probe,
            &|mut v| Cpu::gather_logprobs(v.remove(0), &targets),
            &|mut v| composite::gather_logprobs(v.remove(0), &targets),
        );
    }
}
