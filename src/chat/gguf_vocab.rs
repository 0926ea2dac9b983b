//! A GGUF file's tokenizer as a Hugging Face `tokenizer.json`, and its
//! chat format (template, special tokens, stop ids).
//!
//! GGUF keeps the vocabulary as `tokenizer.ggml.tokens` (id order),
//! `tokenizer.ggml.token_type` (1 normal, 2 unknown, 3 control, 4 user
//! defined, 5 unused, 6 byte) and, for byte-level BPE (`tokenizer.ggml.model
//! = "gpt2"`), `tokenizer.ggml.merges` ("a b" strings, rank order). How
//! text is split before BPE is named by `tokenizer.ggml.pre`; each name
//! maps to the pre-tokenizer the original tokenizer.json had (llama.cpp's
//! `llama-vocab.cpp` lists the regexes). Other tokenizer models
//! (SentencePiece `llama`, WordPiece `bert`, ...) and unknown pre-tokenizer
//! names are refused by name.

use serde_json::{json, Value as Json};

use super::builtin::{self, END_OF_TURN};
use super::tokenizer::FolderFormat;
use super::ChatError;
use crate::gguf::{GgufFile, Value};

/// GPT-2's split (tokenizers' ByteLevel `use_regex`).
const GPT2: &str = "gpt2";
/// Llama 3's split: contractions, letters with one leading non-letter,
/// numbers in groups of up to three, punctuation runs, newlines, spaces.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: as Llama 3's with single digits.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(regex: &str) -> Json {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` name.
fn pre_tokenizer(pre: &str) -> Option<Json> {
    Some(match pre {
        "default" | "gpt-2" | GPT2 => byte_level(true),
        // SmolLM and StarCoder: every digit alone, then GPT-2's split.
        "smollm" | "starcoder" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" => json!({"type": "Sequence",
            "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]}),
        "qwen2" | "qwen3" => json!({"type": "Sequence",
            "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]}),
        _ => return None,
    })
}

fn strings(file: &GgufFile, key: &str) -> Result<Vec<String>, ChatError> {
    let list = file
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| ChatError::new(&file.path, format!("no `{key}` array")))?;
    list.iter()
        .map(|v| v.as_str().map(str::to_string))
        .collect::<Option<Vec<String>>>()
        .ok_or_else(|| ChatError::new(&file.path, format!("`{key}` must hold strings")))
}

fn text(file: &GgufFile, key: &str) -> Option<String> {
    file.get(key).and_then(Value::as_str).map(str::to_string)
}

fn id(file: &GgufFile, key: &str) -> Option<u32> {
    file.get(key).and_then(Value::as_u64).map(|n| n as u32)
}

/// The file's tokenizer as `tokenizer.json` text.
pub fn tokenizer_json(file: &GgufFile) -> Result<String, ChatError> {
    let model = text(file, "tokenizer.ggml.model").unwrap_or_default();
    if model != GPT2 {
        return Err(ChatError::new(
            &file.path,
            format!("`tokenizer.ggml.model` is \"{model}\"; posttrain reads byte-level BPE (\"gpt2\") vocabularies from GGUF only"),
        ));
    }
    let pre_name = text(file, "tokenizer.ggml.pre").unwrap_or_else(|| "default".into());
    let pre = pre_tokenizer(&pre_name).ok_or_else(|| {
        ChatError::new(
            &file.path,
            format!("`tokenizer.ggml.pre` is \"{pre_name}\"; posttrain knows default, gpt-2, smollm, starcoder, llama-bpe, qwen2"),
        )
    })?;
    let tokens = strings(file, "tokenizer.ggml.tokens")?;
    let merges = strings(file, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match file
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
    {
        Some(t) => t.iter().map(|v| v.as_f64().unwrap_or(1.0) as i64).collect(),
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(ChatError::new(
            &file.path,
            format!(
                "`tokenizer.ggml.token_type` has {} entries for {} tokens",
                types.len(),
                tokens.len()
            ),
        ));
    }
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
    }
    let added: Vec<Json> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, ty))| **ty == CONTROL || **ty == USER_DEFINED)
        .map(|(i, (t, ty))| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": *ty == USER_DEFINED, "special": *ty == CONTROL})
        })
        .collect();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    Ok(serde_json::to_string(&tokenizer).expect("JSON serializes"))
}

/// The file's chat template and special tokens, as a model folder's
/// tokenizer_config.json / generation_config.json would hold them.
pub fn chat_format(file: &GgufFile) -> Result<FolderFormat, ChatError> {
    let tokens = strings(file, "tokenizer.ggml.tokens")?;
    let name = |key: &str| -> Option<String> {
        id(file, key).and_then(|i| tokens.get(i as usize).cloned())
    };
    let eos = id(file, "tokenizer.ggml.eos_token_id");
    let mut eos_ids: Vec<u32> = eos.into_iter().collect();
    // Chat models' end of turn, where llama.cpp records one.
    eos_ids.extend(id(file, "tokenizer.ggml.eot_token_id").filter(|e| Some(*e) != eos));
    Ok(FolderFormat {
        template: text(file, "tokenizer.chat_template").map(|t| (t, file.path.clone())),
        bos_token: name("tokenizer.ggml.bos_token_id"),
        eos_token: name("tokenizer.ggml.eos_token_id"),
        pad_token: name("tokenizer.ggml.padding_token_id"),
        eos_token_ids: eos_ids,
    })
}

/// The `tokenizer.ggml.pre` name of a tokenizer.json pre-tokenizer, if it
/// is one GGUF readers know.
fn pre_name(pre: &Json) -> Option<&'static str> {
    // Compare what decides the split, not formatting or defaults.
    fn shape(v: &Json) -> Json {
        match v.get("type").and_then(Json::as_str) {
            Some("Sequence") => Json::Array(
                v.get("pretokenizers")
                    .and_then(Json::as_array)
                    .map(|a| a.iter().map(shape).collect())
                    .unwrap_or_default(),
            ),
            Some("ByteLevel") => json!([
                "ByteLevel",
                v.get("use_regex").cloned().unwrap_or(json!(true))
            ]),
            Some("Digits") => json!(["Digits", v.get("individual_digits")]),
            Some("Split") => json!(["Split", v.pointer("/pattern/Regex")]),
            other => json!([other]),
        }
    }
    let want = shape(pre);
    ["gpt-2", "smollm", "llama-bpe", "qwen2"]
        .into_iter()
        .find(|name| pre_tokenizer(name).map(|p| shape(&p)) == Some(want.clone()))
}

/// A model folder's tokenizer (byte-level BPE) and chat format as GGUF
/// `tokenizer.*` metadata.
pub fn gguf_metadata(dir: &std::path::Path) -> Result<Vec<(String, Value)>, ChatError> {
    let path = dir.join(super::tokenizer::TOKENIZER_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| ChatError::new(&path, e.to_string()))?;
    let tj: Json =
        serde_json::from_str(&text).map_err(|e| ChatError::new(&path, format!("not JSON: {e}")))?;
    let model = tj.get("model").cloned().unwrap_or(Json::Null);
    if model.get("type").and_then(Json::as_str) != Some("BPE") {
        return Err(ChatError::new(
            &path,
            "GGUF export writes byte-level BPE tokenizers only; this one is not BPE",
        ));
    }
    let pre = tj.get("pre_tokenizer").cloned().unwrap_or(Json::Null);
    let pre = pre_name(&pre).ok_or_else(|| {
        ChatError::new(
            &path,
            "its pre-tokenizer is none GGUF readers know (gpt-2, smollm, llama-bpe, qwen2)",
        )
    })?;
    let mut by_id: Vec<Option<(String, i32)>> = Vec::new();
    let mut put = |id: usize, t: String, ty: i32| {
        if by_id.len() <= id {
            by_id.resize(id + 1, None);
        }
        by_id[id] = Some((t, ty));
    };
    if let Some(vocab) = model.get("vocab").and_then(Json::as_object) {
        for (t, id) in vocab {
            if let Some(id) = id.as_u64() {
                put(id as usize, t.clone(), 1);
            }
        }
    }
    for a in tj
        .get("added_tokens")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        if let (Some(id), Some(t)) = (
            a.get("id").and_then(Json::as_u64),
            a.get("content").and_then(Json::as_str),
        ) {
            let special = a.get("special").and_then(Json::as_bool).unwrap_or(false);
            put(
                id as usize,
                t.to_string(),
                if special {
                    CONTROL as i32
                } else {
                    USER_DEFINED as i32
                },
            );
        }
    }
    let (tokens, types): (Vec<Value>, Vec<Value>) = by_id
        .into_iter()
        .enumerate()
        .map(|(i, t)| match t {
            Some((t, ty)) => (Value::String(t), Value::I32(ty)),
            // llama.cpp fills holes in the id space the same way.
            None => (Value::String(format!("[PAD{i}]")), Value::I32(5)),
        })
        .unzip();
    let merges: Vec<Value> = model
        .get("merges")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => Some(Value::String(s.clone())),
            Json::Array(p) => Some(Value::String(format!(
                "{} {}",
                p.first()?.as_str()?,
                p.get(1)?.as_str()?
            ))),
            _ => None,
        })
        .collect();
    let mut format = FolderFormat::read(dir)?;
    if format.template.is_none() && tokens.iter().any(|t| t.as_str() == Some(END_OF_TURN)) {
        // posttrain's own template, as Jinja, so llama.cpp can chat with it.
        format.template = Some((builtin::JINJA.to_string(), dir.to_path_buf()));
        format.eos_token = Some(END_OF_TURN.to_string());
        format.pad_token = Some(builtin::PAD.to_string());
    }
    let id_of = |t: &Option<String>| -> Option<u32> {
        let t = t.as_deref()?;
        tokens
            .iter()
            .position(|x| x.as_str() == Some(t))
            .map(|i| i as u32)
    };
    let mut m = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String(GPT2.into()),
        ),
        ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(tokens.clone()),
        ),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
        (
            "tokenizer.ggml.add_bos_token".to_string(),
            Value::Bool(false),
        ),
    ];
    let eos = id_of(&format.eos_token).or(format.eos_token_ids.first().copied());
    let named = [
        ("tokenizer.ggml.bos_token_id", id_of(&format.bos_token)),
        ("tokenizer.ggml.eos_token_id", eos),
        ("tokenizer.ggml.padding_token_id", id_of(&format.pad_token)),
    ];
    for (k, v) in named {
        if let Some(v) = v {
            m.push((k.to_string(), Value::U32(v)));
        }
    }
    if let Some((source, _)) = format.template {
        m.push(("tokenizer.chat_template".to_string(), Value::String(source)));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{write, GgmlType, WriteTensor};

    fn file_with(meta: Vec<(String, Value)>) -> (tempfile::TempDir, GgufFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vocab.gguf");
        let values = [0f32; 32];
        let t = WriteTensor {
            name: "token_embd.weight".into(),
            shape: vec![1, 32],
            values: &values,
            kind: GgmlType::F32,
        };
        write(&path, &meta, &[t]).unwrap();
        let f = GgufFile::open(&path).unwrap();
        (dir, f)
    }

    fn strs(v: &[&str]) -> Value {
        Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
    }

    #[test]
    fn a_byte_level_vocabulary_becomes_a_working_tokenizer() {
        let (_d, f) = file_with(vec![
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
            (
                "tokenizer.ggml.tokens".into(),
                strs(&["<|im_end|>", "h", "i", "hi", "Ġ", "Ġhi"]),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(vec![
                    Value::I32(3),
                    Value::I32(1),
                    Value::I32(1),
                    Value::I32(1),
                    Value::I32(1),
                    Value::I32(1),
                ]),
            ),
            ("tokenizer.ggml.merges".into(), strs(&["h i", "Ġ hi"])),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(0)),
        ]);
        let json = tokenizer_json(&f).unwrap();
        let tok = tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap();
        let ids = tok
            .encode("hi hi<|im_end|>", false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(ids, [3, 5, 0]); // merges applied, the control token kept whole
        assert_eq!(tok.decode(&ids, false).unwrap(), "hi hi<|im_end|>");
        let fmt = chat_format(&f).unwrap();
        assert_eq!(fmt.eos_token.as_deref(), Some("<|im_end|>"));
    }

    #[test]
    fn other_tokenizer_models_and_splits_are_refused_by_name() {
        let (_d, f) = file_with(vec![(
            "tokenizer.ggml.model".into(),
            Value::String("llama".into()),
        )]);
        let e = tokenizer_json(&f).unwrap_err().to_string();
        assert!(
            e.contains("vocab.gguf") && e.contains("`tokenizer.ggml.model` is \"llama\""),
            "{e}"
        );
        let (_d, f) = file_with(vec![
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            (
                "tokenizer.ggml.pre".into(),
                Value::String("deepseek-coder".into()),
            ),
        ]);
        let e = tokenizer_json(&f).unwrap_err().to_string();
        assert!(
            e.contains("`tokenizer.ggml.pre` is \"deepseek-coder\""),
            "{e}"
        );
    }
}
