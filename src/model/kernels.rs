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
use num_traits::{Float, One, Zero};

use super::llama::{Rope, T2, T3};
use super::params::Matrix;

pub type T4<E, D, T> = Tensor<(usize, usize, usize, usize), E, D, T>;

/// The model's fused ops; a device implements what it can fuse.
pub trait Kernels<E: Dtype + From<f32>>: Device<E> {
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

/// The fused CPU kernels, for f32 (training) and f64 (gradient checks).
/// Inputs are made contiguous first (a view when they already are), so
/// logical and buffer order agree for gradients too.
macro_rules! cpu_kernels {
    ($module:ident, $dtype:ty) => {
        mod $module {
            use super::*;

            type E = $dtype;

            impl Kernels<E> for Cpu {
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
                    let (eps, hn) = (constant::<E>(eps), constant::<E>(h as f64));
                    let mut inv = Vec::with_capacity(xs.len() / h);
                    let mut y = Vec::with_capacity(xs.len());
                    for row in xs.chunks_exact(h) {
                        let ms = row.iter().fold(E::zero(), |a, &v| a + v * v) / hn;
                        let r = (ms + eps).sqrt().recip();
                        inv.push(r);
                        y.extend(row.iter().zip(&ws).map(|(&v, &wc)| v * r * wc));
                    }
                    let out = x.device().tensor_from_vec(y, shape);
                    if T::OWNS_TAPE {
                        let (x_id, w_id, out_id) = (x.ghost(), w.ghost(), out.ghost());
                        tape.add_backward_op(move |grads| {
                            let g = grads.get_or_alloc_mut(&out_id)?.to_vec();
                            let mut gw = vec![E::zero(); h];
                            let gx = grads.get_or_alloc_mut(&x_id)?;
                            let rows = xs.chunks_exact(h).zip(g.chunks_exact(h));
                            for ((r, (xr, gr)), gxr) in
                                inv.iter().zip(rows).zip(gx.chunks_exact_mut(h))
                            {
                                // d/dx_k = g_k w_k r - x_k r^3 / H * sum_c g_c w_c x_c
                                let dot = (0..h).fold(E::zero(), |a, c| a + gr[c] * ws[c] * xr[c]);
                                let k = *r * *r * *r * dot / hn;
                                for c in 0..h {
                                    gxr[c] += gr[c] * ws[c] * *r - xr[c] * k;
                                    gw[c] += gr[c] * xr[c] * *r;
                                }
                            }
                            let gwv = grads.get_or_alloc_mut(&w_id)?;
                            for (a, b) in gwv.iter_mut().zip(gw) {
                                *a += b;
                            }
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
                    let sig: Vec<E> = gs.iter().map(|&g| sigmoid(g)).collect();
                    let y = gs
                        .iter()
                        .zip(&sig)
                        .zip(&us)
                        .map(|((&g, &s), &u)| g * s * u)
                        .collect();
                    let out = gate.device().tensor_from_vec(y, shape);
                    if T::OWNS_TAPE {
                        let (gate_id, up_id, out_id) = (gate.ghost(), up.ghost(), out.ghost());
                        tape.add_backward_op(move |grads| {
                            let g = grads.get_or_alloc_mut(&out_id)?.to_vec();
                            let gg = grads.get_or_alloc_mut(&gate_id)?;
                            let inputs = gs.iter().zip(&sig).zip(&us);
                            for ((d, &o), ((&x, &s), &u)) in gg.iter_mut().zip(&g).zip(inputs) {
                                // silu'(x) = s (1 + x (1 - s)), s = sigmoid(x)
                                *d += o * u * s * (E::one() + x * (E::one() - s));
                            }
                            let gu = grads.get_or_alloc_mut(&up_id)?;
                            let inputs = gs.iter().zip(&sig);
                            for (d, (&o, (&x, &s))) in gu.iter_mut().zip(g.iter().zip(inputs)) {
                                *d += o * x * s;
                            }
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
                    let half = hd / 2;
                    let (x, mut tape) = x.reshape_like(&shape).split_tape();
                    let xs = host(&x);
                    let (cos, sin) = (host(&c.cos), host(&c.sin));
                    let mut y = Vec::with_capacity(xs.len());
                    for (i, head) in xs.chunks_exact(hd).enumerate() {
                        // cos/sin are per (batch, position): shared by the n heads.
                        let at = (i / n) * hd;
                        let (cs, sn) = (&cos[at..at + hd], &sin[at..at + hd]);
                        for j in 0..hd {
                            let rotated = if j < half {
                                -head[j + half]
                            } else {
                                head[j - half]
                            };
                            y.push(head[j] * cs[j] + rotated * sn[j]);
                        }
                    }
                    let out = x.device().tensor_from_vec(y, shape);
                    if T::OWNS_TAPE {
                        let (x_id, out_id) = (x.ghost(), out.ghost());
                        tape.add_backward_op(move |grads| {
                            let g = grads.get_or_alloc_mut(&out_id)?.to_vec();
                            let gx = grads.get_or_alloc_mut(&x_id)?;
                            for (i, (gh, gxh)) in
                                g.chunks_exact(hd).zip(gx.chunks_exact_mut(hd)).enumerate()
                            {
                                let at = (i / n) * hd;
                                let (cs, sn) = (&cos[at..at + hd], &sin[at..at + hd]);
                                // rotate_half^T (g sin) = [g2 sin2, -g1 sin1]
                                for j in 0..hd {
                                    let back = if j < half {
                                        gh[j + half] * sn[j + half]
                                    } else {
                                        -gh[j - half] * sn[j - half]
                                    };
                                    gxh[j] += gh[j] * cs[j] + back;
                                }
                            }
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
                        let start = p.len();
                        let mut max = E::neg_infinity();
                        for (&x, &b) in row.iter().zip(brow) {
                            let z = x * scale + b;
                            max = max.max(z);
                            p.push(z);
                        }
                        // A masked key (bias -1e9) gets exactly 0, as exp underflows
                        // to in the composite op, without the exp; a row that sees no
                        // key at all (a padding query) keeps the plain softmax.
                        let sees_a_key = brow.iter().any(|b| *b == E::zero());
                        let mut sum = E::zero();
                        for (z, b) in p[start..].iter_mut().zip(brow) {
                            *z = if sees_a_key && *b != E::zero() {
                                E::zero()
                            } else {
                                (*z - max).exp()
                            };
                            sum += *z;
                        }
                        for z in &mut p[start..] {
                            *z /= sum;
                        }
                    }
                    let kept = if T::OWNS_TAPE { p.clone() } else { Vec::new() };
                    let out = scores.device().tensor_from_vec(p, shape);
                    if T::OWNS_TAPE {
                        let (x_id, out_id) = (scores.ghost(), out.ghost());
                        tape.add_backward_op(move |grads| {
                            let g = grads.get_or_alloc_mut(&out_id)?.to_vec();
                            let gx = grads.get_or_alloc_mut(&x_id)?;
                            let rows = kept.chunks_exact(sk).zip(g.chunks_exact(sk));
                            for ((pr, gr), gxr) in rows.zip(gx.chunks_exact_mut(sk)) {
                                // d z_k = p_k (g_k - sum_j g_j p_j); d x = scale d z
                                let dot =
                                    pr.iter().zip(gr).fold(E::zero(), |a, (&p, &g)| a + p * g);
                                for k in 0..sk {
                                    gxr[k] += scale * pr[k] * (gr[k] - dot);
                                }
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
                        let max = row.iter().fold(E::neg_infinity(), |m, &x| m.max(x));
                        let target = row[t];
                        let mut sum = E::zero();
                        for x in row.iter_mut() {
                            *x = (*x - max).exp();
                            sum += *x;
                        }
                        out.push(target - max - sum.ln());
                        if T::OWNS_TAPE {
                            row.iter_mut().for_each(|x| *x /= sum);
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

cpu_kernels!(cpu_f32, f32);
cpu_kernels!(cpu_f64, f64);

/// The elements of a contiguous CPU tensor: a memcpy of its buffer.
fn host<S: Shape, E: Dtype + Zero, T>(t: &Tensor<S, E, Cpu, T>) -> Vec<E>
where
    Cpu: CopySlice<E>,
{
    let mut v = vec![E::zero(); t.shape().num_elements()];
    t.copy_into(&mut v);
    v
}

fn sigmoid<E: Float>(x: E) -> E {
    E::one() / (E::one() + (-x).exp())
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
