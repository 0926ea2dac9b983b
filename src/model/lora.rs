//! LoRA (Hu et al., 2021) as PEFT does it: a frozen weight W (out, in) of a
//! targeted projection gets a trainable low-rank update, y = x W^T +
//! (alpha / r) (x A^T) B^T with A (r, in) initialised Kaiming-uniform and B
//! (out, r) zero, so training starts from the base model exactly. Only the
//! adapters (and a reward model's `score` head, PEFT's `modules_to_save`)
//! are trained. Saved in PEFT's format (`adapter_config.json` +
//! `adapter_model.safetensors` with PEFT's tensor names) and merged into a
//! full model (W + (alpha / r) B A) for every stage that reads it.

use std::collections::BTreeMap;
use std::path::Path;

use dfdx::prelude::*;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use super::checkpoint::CheckpointError;
use super::params::{Layer, LlamaParams, Matrix};
use crate::data::rng::Rng;

/// Projections LoRA can target, as PEFT names them.
pub const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// LoRA dropout (PEFT's `lora_dropout`): each adapter's input is masked
/// while training, the kept values scaled by 1 / (1 - p). Masks are drawn
/// only inside [`dropout::scoped`], which the training loop opens around
/// each part's loss with its own seed (stage seed, step, micro-step,
/// part): the n-th adapter applied in the scope uses mask n, element i
/// kept when a counter-based hash of (seed, n, i) is at least p. So masks
/// do not depend on threads or timing, a resumed run draws the same ones,
/// and outside a scope (evaluation, reference log-probs, sampling) the
/// adapters see their whole input. The CPU decoder op and the op-by-op
/// layers draw in the same order (q, k, v, o, gate, up, down per layer).
pub mod dropout {
    use std::cell::Cell;

    thread_local! {
        static SCOPE: Cell<Option<(u64, u64)>> = const { Cell::new(None) };
    }

    /// `f` with dropout masks drawn from `seed` (restores any outer scope).
    pub fn scoped<R>(seed: u64, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<(u64, u64)>);
        impl Drop for Restore {
            fn drop(&mut self) {
                SCOPE.with(|s| s.set(self.0));
            }
        }
        let _restore = Restore(SCOPE.with(|s| s.replace(Some((seed, 0)))));
        f()
    }

    /// The key of the next mask, for an adapter with dropout `p`; `None`
    /// outside a scope or when `p` is 0 (no mask, nothing drawn).
    pub fn next_key(p: f64) -> Option<u64> {
        if p <= 0.0 {
            return None;
        }
        SCOPE.with(|s| {
            let (seed, n) = s.get()?;
            s.set(Some((seed, n + 1)));
            Some(mix(seed ^ mix(n.wrapping_add(0x9e37_79b9_7f4a_7c15))))
        })
    }

    /// The mask of `key`: 0 or 1 / (1 - p) (rounded through f32, so f32
    /// and f64 models keep the same elements scaled alike) per element.
    pub fn mask<E: From<f32> + Copy>(key: u64, p: f64, len: usize) -> Vec<E> {
        let (zero, kept) = (E::from(0.0), E::from((1.0 / (1.0 - p)) as f32));
        (0..len)
            .map(|i| {
                let u = (mix(key ^ (i as u64).wrapping_mul(0xd1b5_4a32_d192_ed03)) >> 11) as f64
                    / (1u64 << 53) as f64;
                if u >= p {
                    kept
                } else {
                    zero
                }
            })
            .collect()
    }

    /// The seed of one part of one micro-step of a training step.
    pub fn part_seed(seed: u64, step: usize, micro: usize, part: usize) -> u64 {
        [step, micro, part]
            .iter()
            .fold(mix(seed), |h, x| mix(h ^ *x as u64))
    }

    /// SplitMix64's finaliser.
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// `lora = { r = 16, alpha = 32, dropout = 0.0, target = [...] }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSettings {
    /// Rank. Default 16.
    pub r: usize,
    /// Scale numerator: the update is (alpha / r) B A. Default 32.
    pub alpha: f64,
    /// Dropout on each adapter's input while training (PEFT's
    /// `lora_dropout`), in [0, 1). Default 0.0. `sft` only: the preference
    /// stages train without dropout, as TRL's `disable_dropout` does.
    pub dropout: f64,
    /// Projections to adapt. Default the attention's q, k, v, o.
    pub target: Vec<String>,
}

impl Default for LoraSettings {
    fn default() -> Self {
        LoraSettings {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            target: ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
        }
    }
}

impl LoraSettings {
    /// [`LoraSettings::validate`] for a stage that trains without dropout
    /// (`kind`: the stage kind, for the message).
    pub fn validate_without_dropout(&self, kind: &str) -> Result<(), (String, String)> {
        self.validate()?;
        if self.dropout != 0.0 {
            return Err((
                "lora.dropout".into(),
                format!(
                    "is {}; `{kind}` trains without dropout (as TRL's disable_dropout = true \
                     does), so only 0.0 is valid here: remove it or set 0.0",
                    self.dropout
                ),
            ));
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.r == 0 {
            return Err(("lora.r".into(), "must be at least 1".into()));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err((
                "lora.alpha".into(),
                format!("must be a positive number, got {}", self.alpha),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err((
                "lora.dropout".into(),
                format!(
                    "is {}; a probability in [0, 1) is valid (PEFT's default 0.0, often 0.05)",
                    self.dropout
                ),
            ));
        }
        if self.target.is_empty() {
            return Err((
                "lora.target".into(),
                format!("is empty; name some of {}", TARGETS.join(", ")),
            ));
        }
        for t in &self.target {
            if !TARGETS.contains(&t.as_str()) {
                return Err((
                    "lora.target".into(),
                    format!(
                        "names `{t}`{}; valid: {}",
                        crate::text::did_you_mean(t, TARGETS.iter().copied()),
                        TARGETS.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }
}

/// One adapter: A (r, in) and B (out, r).
pub type Adapter<E, D> = (Matrix<E, D>, Matrix<E, D>);

/// One layer's adapters, by targeted projection.
#[derive(Debug, Clone)]
pub struct LayerLora<E: Dtype, D: Storage<E>> {
    pub scale: f64,
    /// Dropout on each adapter's input inside [`dropout::scoped`] (0: none).
    pub dropout: f64,
    pub adapters: BTreeMap<&'static str, Adapter<E, D>>,
}

/// The (out, in) weight of projection `target` of a layer.
pub fn weight<'a, E: Dtype, D: Storage<E>>(
    layer: &'a Layer<E, D>,
    target: &str,
) -> &'a Matrix<E, D> {
    match target {
        "q_proj" => &layer.q_proj,
        "k_proj" => &layer.k_proj,
        "v_proj" => &layer.v_proj,
        "o_proj" => &layer.o_proj,
        "gate_proj" => &layer.gate_proj,
        "up_proj" => &layer.up_proj,
        "down_proj" => &layer.down_proj,
        other => panic!("not a LoRA target: {other}"),
    }
}

fn weight_mut<'a, E: Dtype, D: Storage<E>>(
    layer: &'a mut Layer<E, D>,
    target: &str,
) -> &'a mut Matrix<E, D> {
    match target {
        "q_proj" => &mut layer.q_proj,
        "k_proj" => &mut layer.k_proj,
        "v_proj" => &mut layer.v_proj,
        "o_proj" => &mut layer.o_proj,
        "gate_proj" => &mut layer.gate_proj,
        "up_proj" => &mut layer.up_proj,
        "down_proj" => &mut layer.down_proj,
        other => panic!("not a LoRA target: {other}"),
    }
}

/// PEFT's module path of a projection.
fn module(target: &str) -> &'static str {
    match target {
        "q_proj" | "k_proj" | "v_proj" | "o_proj" => "self_attn",
        _ => "mlp",
    }
}

/// PEFT's tensor name of an adapter matrix (`which` = "lora_A" / "lora_B").
pub fn peft_name(layer: usize, target: &str, which: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{target}.{which}.weight",
        module(target)
    )
}

/// PEFT's name of a fully trained head (`modules_to_save`).
pub const SCORE_NAME: &str = "base_model.model.score.weight";

fn target_static(t: &str) -> &'static str {
    TARGETS
        .iter()
        .find(|x| **x == t)
        .copied()
        .expect("validated")
}

impl<E: Dtype + From<f32>, D: Device<E>> LlamaParams<E, D> {
    /// Add fresh adapters to every layer: A Kaiming-uniform (bound
    /// 1/sqrt(in), PEFT's `kaiming_uniform_(a=sqrt(5))`), B zero, so the
    /// model computes exactly what it did.
    pub fn attach_lora(&mut self, s: &LoraSettings, seed: u64) {
        let mut rng = Rng::fork(seed, "lora-init");
        for layer in &mut self.layers {
            let mut adapters = BTreeMap::new();
            for t in &s.target {
                let t = target_static(t);
                let (out, inp) = *weight(layer, t).shape();
                let dev = weight(layer, t).device().clone();
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<E> = (0..s.r * inp)
                    .map(|_| E::from(((rng.uniform() * 2.0 - 1.0) * bound) as f32))
                    .collect();
                let a = dev.tensor_from_vec(a, (s.r, inp));
                let b = dev.zeros_like(&(out, s.r));
                adapters.insert(t, (a, b));
            }
            layer.lora = Some(Box::new(LayerLora {
                scale: s.scale(),
                dropout: s.dropout,
                adapters,
            }));
        }
    }
}

impl<E: Dtype, D: Device<E>> LlamaParams<E, D> {
    pub fn has_lora(&self) -> bool {
        self.layers.iter().any(|l| l.lora.is_some())
    }

    /// The base model: the adapters left out. Tensors are shared, not
    /// copied (a frozen reference that costs no memory).
    pub fn without_lora(&self) -> LlamaParams<E, D> {
        let mut base = self.clone();
        for l in &mut base.layers {
            l.lora = None;
        }
        base
    }

    /// The trained parameters with their names: with LoRA the adapters
    /// (PEFT names, A before B, layer by layer) and a `score` head; else
    /// every parameter ([`LlamaParams::named`]).
    pub fn trainable(&self) -> Vec<(String, &Matrix<E, D>)> {
        if !self.has_lora() {
            return self.named();
        }
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(l) = &layer.lora {
                for (t, (a, b)) in &l.adapters {
                    out.push((peft_name(i, t, "lora_A"), a));
                    out.push((peft_name(i, t, "lora_B"), b));
                }
            }
        }
        if let Some(score) = &self.score {
            out.push((SCORE_NAME.to_string(), score));
        }
        out
    }

    /// Mutable access, same order as [`Self::trainable`].
    pub fn trainable_mut(&mut self) -> Vec<(String, &mut Matrix<E, D>)> {
        if !self.has_lora() {
            return self.named_mut();
        }
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            if let Some(l) = &mut layer.lora {
                for (t, (a, b)) in l.adapters.iter_mut() {
                    out.push((peft_name(i, t, "lora_A"), a));
                    out.push((peft_name(i, t, "lora_B"), b));
                }
            }
        }
        if let Some(score) = &mut self.score {
            out.push((SCORE_NAME.to_string(), score));
        }
        out
    }
}

impl<E: Dtype + From<f32>, D: Device<E>> LlamaParams<E, D> {
    /// The full model with every adapter merged: W + (alpha / r) B A.
    pub fn merged(&self) -> LlamaParams<E, D> {
        let mut out = self.clone();
        for layer in &mut out.layers {
            let Some(l) = layer.lora.take() else {
                continue;
            };
            for (t, (a, b)) in &l.adapters {
                let w = weight_mut(layer, t);
                let delta = b.clone().matmul(a.clone()) * E::from(l.scale as f32);
                *w = w.clone() + delta;
            }
        }
        out
    }
}

impl<D: Device<f32>> LlamaParams<f32, D> {
    /// The settings the adapters were made with (`None` without LoRA).
    pub fn lora_settings(&self) -> Option<LoraSettings> {
        let l = self.layers.iter().find_map(|l| l.lora.as_ref())?;
        let (a, _) = l.adapters.values().next()?;
        let r = a.shape().0;
        Some(LoraSettings {
            r,
            alpha: l.scale * r as f64,
            dropout: l.dropout,
            target: TARGETS
                .iter()
                .filter(|t| l.adapters.contains_key(**t))
                .map(|t| t.to_string())
                .collect(),
        })
    }

    /// Write the adapters in PEFT's format into `dir`; `base` is the base
    /// model's name or path for `base_model_name_or_path`.
    pub fn save_adapter(&self, base: &str, dir: &Path) -> Result<(), CheckpointError> {
        let s = self.lora_settings().expect("a model with LoRA adapters");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CheckpointError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let task = if self.score.is_some() {
            "SEQ_CLS"
        } else {
            "CAUSAL_LM"
        };
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": task,
            "base_model_name_or_path": base,
            "r": s.r,
            "lora_alpha": s.alpha,
            "lora_dropout": s.dropout,
            "target_modules": s.target,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": if self.score.is_some() { serde_json::json!(["score"]) } else { serde_json::Value::Null },
            "use_rslora": false,
            "use_dora": false,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
        });
        let path = dir.join(ADAPTER_CONFIG);
        let text = serde_json::to_string_pretty(&config).expect("JSON") + "\n";
        std::fs::write(&path, text).map_err(io(&path))?;
        let tensors: Vec<super::checkpoint::NamedTensor<D>> = self
            .trainable()
            .into_iter()
            .map(|(name, t)| {
                let (r, c) = *t.shape();
                (name, vec![r, c], t)
            })
            .collect();
        let path = dir.join(ADAPTER_WEIGHTS);
        let bytes = super::checkpoint::f32_safetensors(&path, &tensors)?;
        std::fs::write(&path, bytes).map_err(io(&path))
    }

    /// Read a PEFT adapter folder onto this (base) model: its settings and
    /// the adapters attached.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<LoraSettings, CheckpointError> {
        let bad = |path: &Path, message: String| CheckpointError::Config {
            path: path.to_path_buf(),
            message,
        };
        let path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&path).map_err(|source| CheckpointError::Io {
            path: path.clone(),
            source,
        })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(&path, e.to_string()))?;
        if v["peft_type"] != "LORA" {
            return Err(bad(
                &path,
                format!("peft_type is {}, expected \"LORA\"", v["peft_type"]),
            ));
        }
        let s = LoraSettings {
            r: v["r"].as_u64().ok_or_else(|| bad(&path, "no `r`".into()))? as usize,
            alpha: v["lora_alpha"]
                .as_f64()
                .ok_or_else(|| bad(&path, "no `lora_alpha`".into()))?,
            dropout: v["lora_dropout"].as_f64().unwrap_or(0.0),
            target: v["target_modules"]
                .as_array()
                .ok_or_else(|| bad(&path, "no `target_modules` list".into()))?
                .iter()
                .filter_map(|t| t.as_str().map(String::from))
                .collect(),
        };
        s.validate()
            .map_err(|(f, m)| bad(&path, format!("`{f}` {m}")))?;
        self.attach_lora(&s, 0);
        let wpath = dir.join(ADAPTER_WEIGHTS);
        let bytes = std::fs::read(&wpath).map_err(|source| CheckpointError::Io {
            path: wpath.clone(),
            source,
        })?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| CheckpointError::Safetensors {
            path: wpath.clone(),
            message: e.to_string(),
        })?;
        for (name, t) in self.trainable_mut() {
            *t = super::checkpoint::f32_matrix(&st, &wpath, &name, t)?;
        }
        Ok(s)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::LlamaConfig;

    fn settings(r: usize) -> LoraSettings {
        LoraSettings {
            r,
            alpha: 6.0,
            dropout: 0.0,
            target: TARGETS.map(String::from).to_vec(),
        }
    }

    /// Adapters r 2, alpha 3 on every target, B away from zero: what the
    /// model's gradient checks train.
    pub(crate) fn attach_every_target(p: &mut LlamaParams<f64, Cpu>) {
        let s = LoraSettings {
            r: 2,
            alpha: 3.0,
            dropout: 0.0,
            target: TARGETS.map(String::from).to_vec(),
        };
        p.attach_lora(&s, 4);
        perturb_b(p);
    }

    /// Set every layer's LoRA dropout (the model has adapters).
    pub(crate) fn set_dropout(p: &mut LlamaParams<f64, Cpu>, dropout: f64) {
        for l in &mut p.layers {
            l.lora.as_mut().expect("adapters attached").dropout = dropout;
        }
    }

    /// B away from zero, so A's gradient and the merged update are not zero.
    pub(crate) fn perturb_b<E: Dtype + From<f32>, D: Device<E>>(p: &mut LlamaParams<E, D>) {
        let mut rng = Rng::new(9);
        for (name, t) in p.trainable_mut() {
            if name.contains("lora_B") {
                let (r, c) = *t.shape();
                let v: Vec<E> = (0..r * c)
                    .map(|_| E::from((rng.uniform() - 0.5) as f32 * 0.4))
                    .collect();
                *t = t.device().tensor_from_vec(v, (r, c));
            }
        }
    }

    #[test]
    fn settings_are_checked_by_name() {
        assert!(settings(4).validate().is_ok());
        let bad = |f: &dyn Fn(&mut LoraSettings)| {
            let mut s = settings(4);
            f(&mut s);
            s.validate().unwrap_err()
        };
        assert_eq!(bad(&|s| s.r = 0).0, "lora.r");
        assert_eq!(bad(&|s| s.dropout = 1.0).0, "lora.dropout");
        assert_eq!(bad(&|s| s.dropout = -0.1).0, "lora.dropout");
        let (field, msg) = bad(&|s| s.target = vec!["q_porj".into()]);
        assert_eq!(field, "lora.target");
        assert!(msg.contains("did you mean `q_proj`"), "{msg}");
        let with_dropout = LoraSettings {
            dropout: 0.05,
            ..LoraSettings::default()
        };
        assert!(with_dropout.validate().is_ok());
        let (field, msg) = with_dropout.validate_without_dropout("dpo").unwrap_err();
        assert_eq!(field, "lora.dropout");
        assert!(msg.contains("`dpo` trains without dropout"), "{msg}");
    }

    #[test]
    fn dropout_masks_keep_one_minus_p_scaled_and_repeat_per_seed() {
        // Outside a scope, or at p = 0, nothing is drawn.
        assert_eq!(dropout::next_key(0.5), None);
        let keys = |seed| {
            dropout::scoped(seed, || {
                assert_eq!(dropout::next_key(0.0), None);
                [dropout::next_key(0.5), dropout::next_key(0.5)]
            })
        };
        let (a, b) = (keys(1), keys(2));
        assert_eq!(a, keys(1), "a seed draws the same masks again");
        assert!(
            a[0] != a[1] && a[0] != b[0],
            "each draw and seed its own mask"
        );
        assert_eq!(dropout::next_key(0.5), None, "the scope is closed again");
        let n = 100_000;
        let m: Vec<f32> = dropout::mask(a[0].unwrap(), 0.25, n);
        let kept = m.iter().filter(|v| **v != 0.0).count() as f64 / n as f64;
        assert!((kept - 0.75).abs() < 0.01, "kept {kept}");
        assert!(m.iter().all(|v| *v == 0.0 || *v == (1.0f64 / 0.75) as f32));
        assert_ne!(m, dropout::mask::<f32>(a[1].unwrap(), 0.25, n));
        assert_ne!(
            dropout::part_seed(9, 1, 0, 0),
            dropout::part_seed(9, 0, 1, 0),
            "steps, micro-steps and parts draw apart"
        );
    }

    #[test]
    fn fresh_adapters_change_nothing_and_merging_adds_scaled_b_a() {
        let dev = Cpu::default();
        let cfg = LlamaConfig::tiny(11, 8, 2, 4, 2);
        let base = LlamaParams::<f64, Cpu>::init(&cfg, false, 1, &dev);
        let batch = crate::model::TokenBatch::right_padded(&[vec![1, 4, 2, 7], vec![5, 9]], 0);
        let logits =
            |p: &LlamaParams<f64, Cpu>| crate::model::llama::logits(p, &batch, NoneTape).as_vec();
        let mut p = base.clone();
        p.attach_lora(&settings(2), 3);
        // B = 0: exactly the base model.
        assert_eq!(logits(&p), logits(&base));
        assert_eq!(
            p.trainable().len(),
            2 * TARGETS.len() * cfg.num_hidden_layers
        );
        perturb_b(&mut p);
        let with = logits(&p);
        assert_ne!(with, logits(&base));
        let merged = p.merged();
        assert!(!merged.has_lora());
        for (x, y) in with.iter().zip(logits(&merged)) {
            assert!((x - y).abs() < 1e-12, "{x} vs {y}");
        }
        // W' = W + (alpha / r) B A, entry by entry, for one target.
        let l = p.layers[1].lora.as_ref().unwrap();
        let (a, b) = &l.adapters["v_proj"];
        let (av, bv) = (a.as_vec(), b.as_vec());
        let (out, inp) = *p.layers[1].v_proj.shape();
        let (w0, w1) = (
            base.layers[1].v_proj.as_vec(),
            merged.layers[1].v_proj.as_vec(),
        );
        for i in 0..out {
            for j in 0..inp {
                let ba: f64 = (0..2).map(|k| bv[i * 2 + k] * av[k * inp + j]).sum();
                let want = w0[i * inp + j] + 3.0 * ba;
                assert!((w1[i * inp + j] - want).abs() < 1e-12);
            }
        }
        // The base view shares the base tensors and has no adapters.
        assert_eq!(logits(&p.without_lora()), logits(&base));
    }

    #[test]
    fn a_peft_adapter_round_trips_with_peft_names_and_config() {
        let dev = Cpu::default();
        let cfg = LlamaConfig::tiny(11, 8, 2, 4, 2);
        let base = LlamaParams::<f32, Cpu>::init(&cfg, false, 1, &dev);
        let mut p = base.clone();
        let s = LoraSettings {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            target: vec!["q_proj".into(), "down_proj".into()],
        };
        p.attach_lora(&s, 5);
        perturb_b(&mut p);
        let dir = tempfile::tempdir().unwrap();
        p.save_adapter("base-model", dir.path()).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(ADAPTER_CONFIG)).unwrap())
                .unwrap();
        assert_eq!(config["peft_type"], "LORA");
        assert_eq!(config["task_type"], "CAUSAL_LM");
        assert_eq!(config["r"], 2);
        assert_eq!(config["lora_alpha"], 4.0);
        assert_eq!(
            config["target_modules"],
            serde_json::json!(["q_proj", "down_proj"])
        );
        assert_eq!(config["base_model_name_or_path"], "base-model");
        let bytes = std::fs::read(dir.path().join(ADAPTER_WEIGHTS)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
        names.sort();
        assert_eq!(names.len(), 8);
        assert!(names
            .contains(&"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into()));
        assert!(
            names.contains(&"base_model.model.model.layers.1.mlp.down_proj.lora_B.weight".into())
        );
        // A (r, in), B (out, r), as PEFT's nn.Linear weights.
        let a = st
            .tensor("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight")
            .unwrap();
        assert_eq!(a.shape(), [2, cfg.intermediate_size]);
        let b = st
            .tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
            .unwrap();
        assert_eq!(b.shape(), [cfg.num_attention_heads * cfg.head_dim(), 2]);

        let mut loaded = base.clone();
        let read = loaded.load_adapter(dir.path()).unwrap();
        assert_eq!(read, s);
        let (x, y) = (p.trainable(), loaded.trainable());
        assert_eq!(x.len(), y.len());
        for ((n1, t1), (n2, t2)) in x.iter().zip(&y) {
            assert_eq!(n1, n2);
            assert_eq!(t1.as_vec(), t2.as_vec(), "{n1}");
        }
    }
}
