//! AdamW with decoupled weight decay (Loshchilov & Hutter), gradient
//! clipping by global norm, and the learning-rate schedule. Written with
//! tensor ops over runtime-shaped parameters, so it runs on any device.

use dfdx::prelude::*;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::model::kernels::host;
use crate::model::params::{is_vector, LlamaParams, Matrix};

/// Optimizer and schedule settings (the `train` table of training stages).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSettings {
    /// Optimizer steps. Default 200.
    pub steps: usize,
    /// Sequences per micro-batch. Default 16.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (gradient accumulation). Default 1.
    pub grad_accum: usize,
    /// Peak learning rate. Default 1e-3.
    pub lr: f64,
    /// Linear warm-up steps from 0 to `lr`. Default 20.
    pub warmup_steps: usize,
    /// After warm-up: "cosine" or "linear" decay to `min_lr_ratio * lr`, or "constant".
    pub schedule: Schedule,
    /// Default 0.1.
    pub min_lr_ratio: f64,
    /// Decoupled weight decay on weight matrices (not norms). Default 0.01.
    pub weight_decay: f64,
    /// Default 0.9.
    pub beta1: f64,
    /// Default 0.95.
    pub beta2: f64,
    /// Default 1e-8.
    pub eps: f64,
    /// Clip the gradient's global L2 norm to this (0 = no clipping). Default 1.0.
    pub max_grad_norm: f64,
    /// Evaluate held-out data every N steps (0 = only at the end). Default 50.
    pub eval_every: usize,
    /// Save a resume snapshot (the whole training state) every N steps;
    /// 0 = every ten minutes. Not in the key (see `train::resume`). Default 0.
    pub checkpoint_every: usize,
    /// LoRA adapters to train instead of the whole model, with their seed:
    /// set from the stage's `lora` field, never written in `train`.
    #[serde(skip)]
    pub lora: Option<(crate::model::lora::LoraSettings, u64)>,
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings {
            steps: 200,
            batch_size: 16,
            grad_accum: 1,
            lr: 1e-3,
            warmup_steps: 20,
            schedule: Schedule::Cosine,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            max_grad_norm: 1.0,
            eval_every: 50,
            checkpoint_every: 0,
            lora: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

impl TrainSettings {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |f: &str, m: String| Err((format!("train.{f}"), m));
        if self.steps == 0 {
            return bad("steps", "must be at least 1".into());
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad(
                "batch_size",
                "batch_size and grad_accum must be at least 1".into(),
            );
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", format!("must be a positive number, got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad("beta1", "beta1 and beta2 must be in [0, 1)".into());
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(
                "min_lr_ratio",
                format!("must be between 0 and 1, got {}", self.min_lr_ratio),
            );
        }
        Ok(())
    }

    /// These settings with LoRA on (when `lora` is given), seeded by `seed`.
    pub fn with_lora(
        &self,
        lora: Option<&crate::model::lora::LoraSettings>,
        seed: u64,
    ) -> TrainSettings {
        TrainSettings {
            lora: lora.map(|l| (l.clone(), seed)),
            ..self.clone()
        }
    }

    /// Learning rate at optimizer step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let floor = self.lr * self.min_lr_ratio;
        let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Linear => self.lr - (self.lr - floor) * progress,
            Schedule::Cosine => {
                floor + 0.5 * (self.lr - floor) * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

/// AdamW state: first and second moments per parameter.
pub struct AdamW<D: Device<f32>> {
    m: Vec<Matrix<f32, D>>,
    v: Vec<Matrix<f32, D>>,
    pub step: usize,
}

impl<D: Device<f32>> AdamW<D> {
    pub fn new(params: &LlamaParams<f32, D>) -> Self {
        let zeros = |t: &Matrix<f32, D>| t.device().zeros_like(t.shape());
        let named = params.trainable();
        AdamW {
            m: named.iter().map(|(_, t)| zeros(t)).collect(),
            v: named.iter().map(|(_, t)| zeros(t)).collect(),
            step: 0,
        }
    }

    /// The first and second moments, in `params.trainable()` order.
    #[allow(clippy::type_complexity)]
    pub fn moments(&self) -> (&[Matrix<f32, D>], &[Matrix<f32, D>]) {
        (&self.m, &self.v)
    }

    /// Replace the moments (a resumed stage); shapes as [`AdamW::new`]'s.
    pub fn set_moments(&mut self, m: Vec<Matrix<f32, D>>, v: Vec<Matrix<f32, D>>, step: usize) {
        assert_eq!((m.len(), v.len()), (self.m.len(), self.v.len()));
        self.m = m;
        self.v = v;
        self.step = step;
    }
}

impl<D: OptimDevice> AdamW<D> {
    /// One update with gradients `grads` (same order as `params.trainable()`),
    /// already scaled by `clip_scale`.
    pub fn update(
        &mut self,
        params: &mut LlamaParams<f32, D>,
        grads: Vec<Matrix<f32, D>>,
        lr: f64,
        s: &TrainSettings,
        clip_scale: f64,
    ) {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (s.beta1, s.beta2);
        let bias1 = 1.0 / (1.0 - b1.powi(t));
        let bias2 = 1.0 / (1.0 - b2.powi(t));
        let moments = std::mem::take(&mut self.m)
            .into_iter()
            .zip(std::mem::take(&mut self.v));
        let trained = params.trainable_mut().into_iter().zip(grads).zip(moments);
        for (((name, p), g), (m, v)) in trained {
            let h = AdamStep {
                grad_scale: clip_scale as f32,
                b1: b1 as f32,
                b2: b2 as f32,
                bias1: bias1 as f32,
                bias2: bias2 as f32,
                eps: s.eps as f32,
                decay: if is_vector(&name) {
                    0.0
                } else {
                    s.weight_decay as f32
                },
                lr: lr as f32,
            };
            let (m, v) = D::adamw(p, m, v, g, &h);
            self.m.push(m);
            self.v.push(v);
        }
    }
}

/// The constants of one AdamW update of one parameter.
pub struct AdamStep {
    /// The gradient's clipping factor.
    pub grad_scale: f32,
    pub b1: f32,
    pub b2: f32,
    /// 1 / (1 - b1^t) and 1 / (1 - b2^t).
    pub bias1: f32,
    pub bias2: f32,
    pub eps: f32,
    /// Decoupled weight decay (0 for norms and biases).
    pub decay: f32,
    pub lr: f32,
}

/// The optimizer's arithmetic on a device: dfdx's element-wise ops by
/// default; the CPU runs each parameter's update as one pass over host
/// copies (dfdx's ops were a dozen passes and buffers per parameter, 14% of
/// a SmolLM2 step).
pub trait OptimDevice: Device<f32> {
    /// One AdamW update of `p` with gradient `g`: the new moments.
    fn adamw(
        p: &mut Matrix<f32, Self>,
        m: Matrix<f32, Self>,
        v: Matrix<f32, Self>,
        g: Matrix<f32, Self>,
        h: &AdamStep,
    ) -> (Matrix<f32, Self>, Matrix<f32, Self>) {
        adamw_composite(p, m, v, g, h)
    }

    /// The sum of a gradient's squared elements.
    fn sum_squares(g: &Matrix<f32, Self>) -> f64 {
        g.clone().square().sum::<(), Axes2<0, 1>>().as_vec()[0] as f64
    }
}

impl OptimDevice for Cpu {
    fn adamw(
        p: &mut Matrix<f32, Cpu>,
        m: Matrix<f32, Cpu>,
        v: Matrix<f32, Cpu>,
        g: Matrix<f32, Cpu>,
        h: &AdamStep,
    ) -> (Matrix<f32, Cpu>, Matrix<f32, Cpu>) {
        // Each copy is made as the buffer it copies is dropped, so the
        // allocator hands the freed block straight back.
        let shape = *p.shape();
        let g = consume(g);
        let mut m = consume(m);
        let mut v = consume(v);
        let mut w = host(&*p);
        // Element-wise, so split over the pool's threads (the training
        // workers are idle while the optimizer runs) with the same result.
        w.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((w, m), v), g)| {
                for (((w, m), v), &g) in w.iter_mut().zip(m).zip(v).zip(g) {
                    // The same operations, in the same order, as the default.
                    let g = g * h.grad_scale;
                    *m = *m * h.b1 + g * (1.0 - h.b1);
                    *v = *v * h.b2 + g * g * (1.0 - h.b2);
                    let mut step = (*m * h.bias1) / ((*v * h.bias2).sqrt() + h.eps);
                    if h.decay > 0.0 {
                        step += *w * h.decay;
                    }
                    *w -= step * h.lr;
                }
            });
        drop(g);
        let dev = p.device().clone();
        *p = dev.tensor_from_vec(w, shape);
        (dev.tensor_from_vec(m, shape), dev.tensor_from_vec(v, shape))
    }

    fn sum_squares(g: &Matrix<f32, Cpu>) -> f64 {
        // Fixed blocks summed in order: the same total on any thread count.
        let blocks: Vec<f64> = host(g)
            .par_chunks(4096)
            .map(|c| c.iter().map(|x| x * x).sum::<f32>() as f64)
            .collect();
        blocks.iter().sum()
    }
}

#[cfg(feature = "cuda")]
impl OptimDevice for dfdx::tensor::Cuda {}

/// [`OptimDevice::adamw`] in dfdx's element-wise ops, for any device.
pub fn adamw_composite<D: Device<f32>>(
    p: &mut Matrix<f32, D>,
    m: Matrix<f32, D>,
    v: Matrix<f32, D>,
    g: Matrix<f32, D>,
    h: &AdamStep,
) -> (Matrix<f32, D>, Matrix<f32, D>) {
    // Every tensor below is owned and unshared where dfdx can reuse its
    // buffer (its element-wise ops write in place into a uniquely held
    // operand).
    let g = g * h.grad_scale;
    let m = m * h.b1 + g.clone() * (1.0 - h.b1);
    let v = v * h.b2 + g.square() * (1.0 - h.b2);
    let denom = (v.clone() * h.bias2).sqrt() + h.eps;
    let mut step = (m.clone() * h.bias1) / denom;
    if h.decay > 0.0 {
        step = step + p.clone() * h.decay;
    }
    *p = p.clone() - step * h.lr;
    (m, v)
}

/// Elements per parallel task of the CPU optimizer.
const CHUNK: usize = 1 << 15;

/// A CPU tensor's elements; the tensor (and its buffer) dropped after.
fn consume(t: Matrix<f32, Cpu>) -> Vec<f32> {
    host(&t)
}

/// The global L2 norm of a set of gradients.
pub fn global_norm<D: OptimDevice>(grads: &[Matrix<f32, D>]) -> f64 {
    grads.iter().map(D::sum_squares).sum::<f64>().sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_reaches_the_floor() {
        let s = TrainSettings {
            steps: 110,
            warmup_steps: 10,
            lr: 1.0,
            min_lr_ratio: 0.1,
            ..TrainSettings::default()
        };
        assert!((s.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(60) - 0.55).abs() < 1e-12, "half way: midpoint");
        assert!((s.lr_at(110) - 0.1).abs() < 1e-12);
        let lin = TrainSettings {
            schedule: Schedule::Linear,
            ..s
        };
        assert!((lin.lr_at(60) - 0.55).abs() < 1e-12);
    }

    #[test]
    fn cpu_adamw_equals_the_composite_update() {
        let dev = Cpu::default();
        let shape = (3, 5);
        let t = |k: f32| -> Matrix<f32, Cpu> {
            let v = (0..15)
                .map(|i| ((i as f32 * k).sin() * 0.7).abs() + 0.01)
                .collect();
            dev.tensor_from_vec(v, shape)
        };
        let h = AdamStep {
            grad_scale: 0.8,
            b1: 0.9,
            b2: 0.95,
            bias1: 1.0 / (1.0 - 0.9f32.powi(3)),
            bias2: 1.0 / (1.0 - 0.95f32.powi(3)),
            eps: 1e-8,
            decay: 0.1,
            lr: 0.01,
        };
        let (mut p0, mut p1) = (t(1.0), t(1.0));
        let (m0, v0) = adamw_composite(&mut p0, t(2.0), t(3.0), t(-4.0), &h);
        let (m1, v1) = Cpu::adamw(&mut p1, t(2.0), t(3.0), t(-4.0), &h);
        for (a, b) in [(p0, p1), (m0, m1), (v0, v1)] {
            let (a, b) = (a.as_vec(), b.as_vec());
            assert_ne!(a, t(1.0).as_vec());
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0), "{x} vs {y}");
            }
        }
        let g = t(5.0);
        let want: f64 = g.as_vec().iter().map(|x| (x * x) as f64).sum();
        assert!((Cpu::sum_squares(&g) - want).abs() < 1e-5 * want);
    }

    #[test]
    fn adamw_first_step_matches_hand_computation() {
        // With m = v = 0, the first bias-corrected step is lr * g / (|g| + eps)
        // plus decoupled decay lr * wd * p.
        let dev = Cpu::default();
        let cfg = crate::model::LlamaConfig::tiny(5, 4, 1, 2, 1);
        let mut p = LlamaParams::<f32, Cpu>::init(&cfg, false, 0, &dev);
        let before: Vec<Vec<f32>> = p.named().iter().map(|(_, t)| t.as_vec()).collect();
        let grads: Vec<Matrix<f32, Cpu>> = p
            .named()
            .iter()
            .map(|(_, t)| {
                let n = t.shape().0 * t.shape().1;
                dev.tensor_from_vec(
                    (0..n)
                        .map(|i| if i % 2 == 0 { 0.5 } else { -2.0 })
                        .collect(),
                    *t.shape(),
                )
            })
            .collect();
        let s = TrainSettings {
            weight_decay: 0.1,
            eps: 0.0,
            ..TrainSettings::default()
        };
        let mut opt = AdamW::new(&p);
        opt.update(&mut p, grads, 0.01, &s, 1.0);
        for ((name, t), old) in p.named().iter().zip(before) {
            let decay = if is_vector(name) { 0.0 } else { 0.1 };
            for (i, (new, old)) in t.as_vec().iter().zip(old).enumerate() {
                let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
                let expected = old - 0.01 * (sign + decay * old);
                assert!(
                    (new - expected).abs() < 1e-6,
                    "{name}[{i}]: {new} vs {expected}"
                );
            }
        }
    }
}
