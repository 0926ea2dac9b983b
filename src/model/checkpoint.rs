//! Checkpoints as Hugging Face model folders: `config.json` +
//! `model.safetensors` with HF Llama tensor names (plus `tokenizer.json`
//! when the stage has one). Loading checks every name, shape and dtype and
//! says exactly what is missing, unexpected or mismatched; F32, F16, BF16
//! and F64 weights are read (converted to f32); sharded `*.safetensors`
//! folders are read whole.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dfdx::prelude::*;
use safetensors::{Dtype, SafeTensors};

use super::config::LlamaConfig;
use super::params::{expected_shapes, is_vector, LlamaParams, Matrix};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error("{}: not a valid safetensors file: {message}", path.display())]
    Safetensors { path: PathBuf, message: String },
    #[error("{}: the checkpoint does not match its config: {problems}", dir.display())]
    Mismatch { dir: PathBuf, problems: String },
    /// A GGUF file that cannot be read (the message names the file).
    #[error("{0}")]
    Gguf(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write `config.json` and `model.safetensors` into `dir`.
pub fn save<D: Device<f32>>(
    params: &LlamaParams<f32, D>,
    dir: &Path,
) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let config_path = dir.join(CONFIG_FILE);
    let json = serde_json::to_string_pretty(&params.config.to_json()).expect("config serializes");
    std::fs::write(&config_path, json + "\n").map_err(io(&config_path))?;

    let tensors: Vec<NamedTensor<D>> = params
        .named()
        .into_iter()
        .map(|(name, t)| {
            let (r, c) = *t.shape();
            let shape = if is_vector(&name) {
                vec![c]
            } else {
                vec![r, c]
            };
            (name, shape, t)
        })
        .collect();
    let weights = dir.join(WEIGHTS_FILE);
    let bytes = f32_safetensors(&weights, &tensors)?;
    std::fs::write(&weights, bytes).map_err(io(&weights))
}

/// An f32 matrix to write: its name and the shape it is saved with.
pub type NamedTensor<'a, D> = (String, Vec<usize>, &'a Matrix<f32, D>);

/// Named f32 matrices as the bytes of a safetensors file (`path` only
/// names it in errors).
pub fn f32_safetensors<D: Device<f32>>(
    path: &Path,
    tensors: &[NamedTensor<D>],
) -> Result<Vec<u8>, CheckpointError> {
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, t)| t.as_vec().iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .zip(&data)
        .map(|((n, shape, _), b)| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), b)
                .expect("sizes agree");
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize(views, None).map_err(|e| CheckpointError::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Tensor `name` of a safetensors file, which must be F32 with the shape
/// of `like`, as a matrix on `like`'s device.
pub fn f32_matrix<D: Device<f32>>(
    st: &SafeTensors,
    path: &Path,
    name: &str,
    like: &Matrix<f32, D>,
) -> Result<Matrix<f32, D>, CheckpointError> {
    let bad = |message: String| CheckpointError::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    let view = st
        .tensor(name)
        .map_err(|_| bad(format!("tensor `{name}` is missing")))?;
    let (r, c) = *like.shape();
    if view.dtype() != Dtype::F32 || view.shape() != [r, c] {
        return Err(bad(format!(
            "tensor `{name}` is {:?} {:?}, expected F32 [{r}, {c}]",
            view.dtype(),
            view.shape()
        )));
    }
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(like.device().tensor_from_vec(values, (r, c)))
}

/// Read the config of a model folder (either transformers layout) and
/// check it is a supported Llama-family model.
pub fn read_config(dir: &Path) -> Result<LlamaConfig, CheckpointError> {
    let path = dir.join(CONFIG_FILE);
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Config {
            path: path.clone(),
            message: format!("not JSON: {e}"),
        })?;
    LlamaConfig::from_json(&value).map_err(|message| CheckpointError::Config { path, message })
}

/// Set `reward_offset` in a model folder's config.json (the other fields
/// are kept as written).
pub fn set_reward_offset(dir: &Path, offset: f64) -> Result<(), CheckpointError> {
    let path = dir.join(CONFIG_FILE);
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let mut value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Config {
            path: path.clone(),
            message: format!("not JSON: {e}"),
        })?;
    value["reward_offset"] = serde_json::json!(offset);
    let json = serde_json::to_string_pretty(&value).expect("JSON serializes");
    std::fs::write(&path, json + "\n").map_err(io(&path))
}

/// Load a Hugging Face Llama folder onto `dev`.
pub fn load<D: Device<f32>>(dir: &Path, dev: &D) -> Result<LlamaParams<f32, D>, CheckpointError> {
    let cfg = read_config(dir)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(CheckpointError::Mismatch {
            dir: dir.to_path_buf(),
            problems: "no *.safetensors file".into(),
        });
    }
    // name -> (shape, f32 values)
    let mut found: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    for file in &files {
        let bytes = std::fs::read(file).map_err(io(file))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| CheckpointError::Safetensors {
            path: file.clone(),
            message: e.to_string(),
        })?;
        for (name, view) in st.tensors() {
            let values =
                to_f32(view.dtype(), view.data()).ok_or_else(|| CheckpointError::Safetensors {
                    path: file.clone(),
                    message: format!(
                        "tensor `{name}` has dtype {:?}; posttrain reads F32, F16, BF16 and F64",
                        view.dtype()
                    ),
                })?;
            found.insert(name, (view.shape().to_vec(), values));
        }
    }
    // Buffers some exporters save; not parameters.
    found.retain(|name, _| !name.ends_with("rotary_emb.inv_freq"));
    let with_score = found.contains_key("score.weight");
    let expected = expected_shapes(&cfg, with_score);
    let mut problems = Vec::new();
    let missing: Vec<&str> = expected
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !found.contains_key(*n))
        .collect();
    if !missing.is_empty() {
        problems.push(format!("missing tensors: {}", missing.join(", ")));
    }
    let extra: Vec<&str> = found
        .keys()
        .map(String::as_str)
        .filter(|n| !expected.iter().any(|(e, _)| e == n))
        .collect();
    if !extra.is_empty() {
        let hint = if extra.contains(&"lm_head.weight") && cfg.tie_word_embeddings {
            " (the config says tie_word_embeddings = true)"
        } else {
            ""
        };
        problems.push(format!("unexpected tensors: {}{hint}", extra.join(", ")));
    }
    for (name, (r, c)) in &expected {
        if let Some((shape, _)) = found.get(name) {
            let want = if is_vector(name) {
                vec![*c]
            } else {
                vec![*r, *c]
            };
            if *shape != want {
                problems.push(format!(
                    "`{name}` has shape {shape:?}, the config implies {want:?}"
                ));
            }
        }
    }
    if !problems.is_empty() {
        return Err(CheckpointError::Mismatch {
            dir: dir.to_path_buf(),
            problems: problems.join("; "),
        });
    }
    let tensors = expected
        .iter()
        .map(|(name, (r, c))| {
            let (_, values) = found.remove(name).expect("checked present");
            dev.tensor_from_vec(values, (*r, *c))
        })
        .collect();
    Ok(LlamaParams::from_named(cfg, tensors, with_score))
}

/// A pre-trained model being imported (from a Hugging Face folder or a
/// GGUF file) into posttrain's folder layout, without dfdx types leaking
/// to the caller.
pub struct Imported {
    params: LlamaParams<f32, crate::model::Dev>,
}

impl Imported {
    pub fn from_folder(dir: &Path) -> Result<Imported, CheckpointError> {
        Ok(Imported {
            params: load(dir, &crate::model::Dev::default())?,
        })
    }

    pub fn from_gguf(file: &crate::gguf::GgufFile) -> Result<Imported, CheckpointError> {
        Ok(Imported {
            params: super::gguf_checkpoint::load_file(file, &crate::model::Dev::default())?,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.params.config
    }

    /// The first tensor holding a NaN or infinite value, and that value.
    pub fn first_non_finite(&self) -> Option<(String, f32)> {
        self.params.named().into_iter().find_map(|(name, t)| {
            t.as_vec()
                .into_iter()
                .find(|v| !v.is_finite())
                .map(|v| (name, v))
        })
    }

    /// At least `vocab` embedding rows (see [`LlamaParams::grow_vocab`]).
    pub fn grow_vocab(&mut self, vocab: usize) {
        self.params.grow_vocab(vocab);
    }

    /// Written as posttrain saves models (f32, one `model.safetensors`).
    pub fn save(&self, dir: &Path) -> Result<(), CheckpointError> {
        save(&self.params, dir)
    }
}

/// Little-endian weights of a dtype as f32.
fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let f16 = |h: u16| -> f32 {
        let sign = ((h >> 15) as u32) << 31;
        let exp = ((h >> 10) & 0x1f) as u32;
        let frac = (h & 0x3ff) as u32;
        let bits = match exp {
            0 if frac == 0 => sign,
            0 => {
                // Subnormal: normalise.
                let mut e = 127 - 15 + 1;
                let mut f = frac;
                while f & 0x400 == 0 {
                    f <<= 1;
                    e -= 1;
                }
                sign | ((e as u32) << 23) | ((f & 0x3ff) << 13)
            }
            0x1f => sign | 0x7f80_0000 | (frac << 13),
            _ => sign | ((exp + 127 - 15) << 23) | (frac << 13),
        };
        f32::from_bits(bits)
    };
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8")) as f32)
            .collect(),
        // bf16 is the top half of an f32.
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::{logits, TokenBatch};

    #[test]
    fn growing_the_vocabulary_keeps_old_tokens_and_starts_new_ones_at_the_mean() {
        for tied in [false, true] {
            let mut cfg = LlamaConfig::tiny(13, 8, 2, 4, 2);
            cfg.intermediate_size = 12;
            cfg.tie_word_embeddings = tied;
            let mut p = LlamaParams::<f32, Cpu>::init(&cfg, false, 3, &Cpu::default());
            let batch = TokenBatch::right_padded(&[vec![1, 5, 7, 2]], 0);
            let before = logits(&p, &batch, NoneTape).as_vec();
            let old = p.embed_tokens.as_vec();
            p.grow_vocab(16);
            assert_eq!(p.config.vocab_size, 16);
            assert_eq!(p.embed_tokens.shape().0, 16);
            let new = p.embed_tokens.as_vec();
            assert_eq!(&new[..old.len()], &old[..]);
            let mean0: f32 = (0..13).map(|i| old[i * 8]).sum::<f32>() / 13.0;
            assert!((new[13 * 8] - mean0).abs() < 1e-6);
            assert!((new[15 * 8] - mean0).abs() < 1e-6);
            let after = logits(&p, &batch, NoneTape).as_vec();
            // Old tokens' logits are unchanged; 3 new logits per position.
            for t in 0..4 {
                for v in 0..13 {
                    assert!((before[t * 13 + v] - after[t * 16 + v]).abs() < 1e-5);
                }
            }
            // Saved and loaded, the grown model keeps its shape.
            let dir = tempfile::tempdir().unwrap();
            save(&p, dir.path()).unwrap();
            let back: LlamaParams<f32, Cpu> = load(dir.path(), &Cpu::default()).unwrap();
            assert_eq!(back.config.vocab_size, 16);
        }
    }

    fn tiny() -> LlamaParams<f32, Cpu> {
        let mut cfg = LlamaConfig::tiny(13, 8, 2, 4, 2);
        cfg.intermediate_size = 12;
        LlamaParams::init(&cfg, false, 1, &Cpu::default())
    }

    #[test]
    fn save_then_load_gives_identical_logits() {
        let dir = tempfile::tempdir().unwrap();
        let p = tiny();
        save(&p, dir.path()).unwrap();
        let q = load(dir.path(), &Cpu::default()).unwrap();
        let b = TokenBatch::right_padded(&[vec![1, 2, 3, 4]], 0);
        assert_eq!(
            logits(&p, &b, NoneTape).as_vec(),
            logits(&q, &b, NoneTape).as_vec()
        );
    }

    #[test]
    fn truncated_and_corrupt_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        save(&tiny(), dir.path()).unwrap();
        let w = dir.path().join(WEIGHTS_FILE);
        let bytes = std::fs::read(&w).unwrap();
        std::fs::write(&w, &bytes[..bytes.len() - 100]).unwrap();
        let err = load(dir.path(), &Cpu::default()).err().unwrap().to_string();
        assert!(
            err.contains("model.safetensors: not a valid safetensors file"),
            "{err}"
        );
        std::fs::write(&w, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
        let err = load(dir.path(), &Cpu::default()).err().unwrap().to_string();
        assert!(err.contains("not a valid safetensors file"), "{err}");
    }

    #[test]
    fn a_config_that_does_not_match_the_tensors_says_what_differs() {
        let dir = tempfile::tempdir().unwrap();
        save(&tiny(), dir.path()).unwrap();
        let path = dir.path().join(CONFIG_FILE);
        let mut cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        cfg["num_hidden_layers"] = 3.into();
        cfg["intermediate_size"] = 16.into();
        std::fs::write(&path, cfg.to_string()).unwrap();
        let err = load(dir.path(), &Cpu::default()).err().unwrap().to_string();
        assert!(
            err.contains("missing tensors: model.layers.2.input_layernorm.weight"),
            "{err}"
        );
        assert!(err.contains("`model.layers.0.mlp.gate_proj.weight` has shape [12, 8], the config implies [16, 8]"), "{err}");

        cfg["num_hidden_layers"] = 2.into();
        cfg["intermediate_size"] = 12.into();
        cfg["tie_word_embeddings"] = true.into();
        std::fs::write(&path, cfg.to_string()).unwrap();
        let err = load(dir.path(), &Cpu::default()).err().unwrap().to_string();
        assert!(
            err.contains(
                "unexpected tensors: lm_head.weight (the config says tie_word_embeddings = true)"
            ),
            "{err}"
        );

        cfg["model_type"] = "gpt2".into();
        std::fs::write(&path, cfg.to_string()).unwrap();
        let err = load(dir.path(), &Cpu::default()).err().unwrap().to_string();
        assert!(err.contains("`model_type` is \"gpt2\""), "{err}");
    }

    #[test]
    fn half_precision_weights_convert_exactly() {
        // 1.0, -2.5, 65504 (max f16), 2^-24 (smallest subnormal) in f16.
        let f16: [u16; 4] = [0x3c00, 0xc100, 0x7bff, 0x0001];
        let bytes: Vec<u8> = f16.iter().flat_map(|h| h.to_le_bytes()).collect();
        assert_eq!(
            to_f32(Dtype::F16, &bytes).unwrap(),
            [1.0, -2.5, 65504.0, 2f32.powi(-24)]
        );
        let bf16: Vec<u8> = [0x3f80u16, 0xc020]
            .iter()
            .flat_map(|h| h.to_le_bytes())
            .collect();
        assert_eq!(to_f32(Dtype::BF16, &bf16).unwrap(), [1.0, -2.5]);
    }
}
