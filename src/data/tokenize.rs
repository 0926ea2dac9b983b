//! Token ids of datasets through the chat template, cached by content: the
//! key is blake3 over the tokenizer file, the template's text and the rows
//! themselves, so an unchanged input is never tokenized twice, whichever
//! stage or experiment asks, and a changed tokenizer or template never
//! reuses stale ids. Cache files live in `STORE/.cache/tokens/`.

use std::io::{self, Read, Write};
use std::path::PathBuf;

pub use crate::chat::tokenizer::{load_tokenizer, train_bpe, with_chat_tokens, WithChatTokens};
pub use crate::chat::LoadedTokenizer;

use super::formats::{Comparison, Demonstration};
use super::DataError;
use crate::chat::builtin::END_OF_TEXT;

/// Named columns of token id sequences, one entry per row, and each row's
/// group (comparisons from one ranking share a group).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenTable {
    pub columns: Vec<(String, Vec<Vec<u32>>)>,
    pub groups: Vec<u64>,
}

impl TokenTable {
    pub fn column(&self, name: &str) -> &[Vec<u32>] {
        self.columns
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.as_slice())
            .unwrap_or_else(|| panic!("token table has no column `{name}`"))
    }

    pub fn rows(&self) -> usize {
        self.groups.len()
    }

    fn write(&self, out: &mut impl Write) -> io::Result<()> {
        out.write_all(MAGIC)?;
        out.write_all(&(self.columns.len() as u32).to_le_bytes())?;
        out.write_all(&(self.groups.len() as u64).to_le_bytes())?;
        for (name, rows) in &self.columns {
            out.write_all(&(name.len() as u32).to_le_bytes())?;
            out.write_all(name.as_bytes())?;
            for ids in rows {
                out.write_all(&(ids.len() as u32).to_le_bytes())?;
                for id in ids {
                    out.write_all(&id.to_le_bytes())?;
                }
            }
        }
        for g in &self.groups {
            out.write_all(&g.to_le_bytes())?;
        }
        Ok(())
    }

    /// `None` for anything that is not a complete table (a corrupt cache file).
    fn read(bytes: &[u8]) -> Option<TokenTable> {
        let mut r = bytes.strip_prefix(MAGIC)?;
        let u32_ = |r: &mut &[u8]| -> Option<u32> {
            let mut b = [0u8; 4];
            r.read_exact(&mut b).ok()?;
            Some(u32::from_le_bytes(b))
        };
        let n_columns = u32_(&mut r)? as usize;
        let mut b8 = [0u8; 8];
        r.read_exact(&mut b8).ok()?;
        let n_rows = u64::from_le_bytes(b8) as usize;
        let mut columns = Vec::with_capacity(n_columns);
        for _ in 0..n_columns {
            let len = u32_(&mut r)? as usize;
            let name = String::from_utf8(r.get(..len)?.to_vec()).ok()?;
            r = &r[len..];
            let mut rows = Vec::with_capacity(n_rows.min(1 << 24));
            for _ in 0..n_rows {
                let n = u32_(&mut r)? as usize;
                let raw = r.get(..n * 4)?;
                rows.push(
                    raw.chunks_exact(4)
                        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                        .collect(),
                );
                r = &r[n * 4..];
            }
            columns.push((name, rows));
        }
        let mut groups = Vec::with_capacity(n_rows.min(1 << 24));
        for _ in 0..n_rows {
            r.read_exact(&mut b8).ok()?;
            groups.push(u64::from_le_bytes(b8));
        }
        r.is_empty().then_some(TokenTable { columns, groups })
    }
}

const MAGIC: &[u8] = b"posttrain-tokens/1\n";

/// Where tokenized tables are kept; counts hits and misses.
pub struct TokenCache {
    dir: Option<PathBuf>,
    pub hits: usize,
    pub misses: usize,
}

impl TokenCache {
    pub fn new(dir: impl Into<PathBuf>) -> TokenCache {
        TokenCache {
            dir: Some(dir.into()),
            hits: 0,
            misses: 0,
        }
    }

    /// A cache that keeps nothing (every call tokenizes).
    pub fn disabled() -> TokenCache {
        TokenCache {
            dir: None,
            hits: 0,
            misses: 0,
        }
    }

    fn get_or_make(
        &mut self,
        key: &str,
        make: impl FnOnce() -> Result<TokenTable, DataError>,
    ) -> Result<TokenTable, DataError> {
        let Some(dir) = &self.dir else {
            self.misses += 1;
            return make();
        };
        let path = dir.join(format!("{key}.bin"));
        if let Ok(bytes) = std::fs::read(&path) {
            match TokenTable::read(&bytes) {
                Some(table) => {
                    self.hits += 1;
                    return Ok(table);
                }
                None => eprintln!(
                    "warning: corrupt token cache {}; tokenizing again",
                    path.display()
                ),
            }
        }
        self.misses += 1;
        let table = make()?;
        // A cache that cannot be written costs only a re-tokenization later.
        let _ = (|| -> io::Result<()> {
            std::fs::create_dir_all(dir)?;
            let tmp = dir.join(format!(".{key}.{}.tmp", std::process::id()));
            let mut f = io::BufWriter::new(std::fs::File::create(&tmp)?);
            table.write(&mut f)?;
            f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        Ok(table)
    }
}

/// Encode texts, each distinct text once: prompts repeat across the pairs
/// of a ranking and responses repeat across prompts.
fn encode(tok: &LoadedTokenizer, texts: Vec<String>) -> Result<Vec<Vec<u32>>, DataError> {
    let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut unique: Vec<&str> = Vec::new();
    let slots: Vec<usize> = texts
        .iter()
        .map(|t| {
            *index.entry(t.as_str()).or_insert_with(|| {
                unique.push(t.as_str());
                unique.len() - 1
            })
        })
        .collect();
    let encodings = tok
        .tokenizer
        .encode_batch(unique, false)
        .map_err(|e| DataError::Invalid {
            path: PathBuf::from("tokenizer.json"),
            message: format!("cannot encode: {e}"),
        })?;
    let ids: Vec<Vec<u32>> = encodings
        .into_iter()
        .map(|e| e.get_ids().to_vec())
        .collect();
    Ok(slots.into_iter().map(|i| ids[i].clone()).collect())
}

/// The cache key of some rows' text under a tokenizer and the template.
fn key(kind: &str, tok: &LoadedTokenizer, texts: &[&[String]]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(format!("{kind}\0tokenizer+template={}\0", tok.hash).as_bytes());
    for column in texts {
        h.update(&(column.len() as u64).to_le_bytes());
        for t in column.iter() {
            h.update(&(t.len() as u64).to_le_bytes());
            h.update(t.as_bytes());
        }
    }
    h.finalize().to_hex().to_string()
}

/// Columns `prompt` (the rendered conversation up to `<|assistant|>`),
/// `chosen` and `rejected` (response + `<|end|>`); groups from the rows.
pub fn comparisons(
    tok: &LoadedTokenizer,
    rows: &[Comparison],
    cache: &mut TokenCache,
) -> Result<TokenTable, DataError> {
    let mut prompts = Vec::with_capacity(rows.len());
    let mut chosen = Vec::with_capacity(rows.len());
    let mut rejected = Vec::with_capacity(rows.len());
    for r in rows {
        let (p, c) = tok.prompt_and_response(&r.prompt, &r.chosen)?;
        let (_, j) = tok.prompt_and_response(&r.prompt, &r.rejected)?;
        prompts.push(p);
        chosen.push(c);
        rejected.push(j);
    }
    let groups: Vec<u64> = rows.iter().map(|r| r.group as u64).collect();
    let group_text: Vec<String> = groups.iter().map(u64::to_string).collect();
    let k = key(
        "comparisons",
        tok,
        &[&prompts, &chosen, &rejected, &group_text],
    );
    cache.get_or_make(&k, || {
        Ok(TokenTable {
            columns: vec![
                ("prompt".into(), encode(tok, prompts)?),
                ("chosen".into(), encode(tok, chosen)?),
                ("rejected".into(), encode(tok, rejected)?),
            ],
            groups,
        })
    })
}

/// Columns `tokens` and `trained` (1 for tokens a loss trains on): a
/// single-turn demonstration is its prompt (untrained) then its response
/// (trained); a multi-turn one trains every assistant turn with its
/// end-of-turn marker and nothing of system or user turns.
pub fn demonstrations(
    tok: &LoadedTokenizer,
    rows: &[Demonstration],
    cache: &mut TokenCache,
) -> Result<TokenTable, DataError> {
    let mut prompts = Vec::with_capacity(rows.len());
    let mut responses = Vec::with_capacity(rows.len());
    for r in rows {
        let (p, a) = tok.prompt_and_response(&r.prompt, &r.response)?;
        prompts.push(p);
        responses.push(a);
    }
    let k = key("demonstrations-masked", tok, &[&prompts, &responses]);
    cache.get_or_make(&k, || {
        let prompt_ids = encode(tok, prompts.clone())?;
        let response_ids = encode(tok, responses.clone())?;
        let mut tokens = Vec::with_capacity(rows.len());
        let mut trained = Vec::with_capacity(rows.len());
        for ((r, p), a) in rows.iter().zip(prompt_ids).zip(response_ids) {
            if r.prompt.iter().any(|m| m.role == "assistant") {
                let mut messages = r.prompt.clone();
                messages.push(crate::chat::Message::assistant(&r.response));
                let (ids, mask) = tok.encode_with_mask(&messages)?;
                tokens.push(ids);
                trained.push(mask.into_iter().map(u32::from).collect());
            } else {
                trained.push(
                    std::iter::repeat_n(0, p.len())
                        .chain(std::iter::repeat_n(1, a.len()))
                        .collect(),
                );
                tokens.push([p, a].concat());
            }
        }
        Ok(TokenTable {
            groups: (0..rows.len() as u64).collect(),
            columns: vec![("tokens".into(), tokens), ("trained".into(), trained)],
        })
    })
}

/// Column `text`: each document followed by `<|endoftext|>`, for packing.
pub fn corpus(
    tok: &LoadedTokenizer,
    docs: &[String],
    cache: &mut TokenCache,
) -> Result<TokenTable, DataError> {
    let texts: Vec<String> = docs.iter().map(|d| format!("{d}{END_OF_TEXT}")).collect();
    let k = key("corpus", tok, &[&texts]);
    cache.get_or_make(&k, || {
        Ok(TokenTable {
            groups: (0..texts.len() as u64).collect(),
            columns: vec![("text".into(), encode(tok, texts)?)],
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_round_trips_and_rejects_truncation() {
        let t = TokenTable {
            columns: vec![
                ("a".into(), vec![vec![1, 2, 3], vec![]]),
                ("b".into(), vec![vec![7], vec![8, 9]]),
            ],
            groups: vec![0, 0],
        };
        let mut bytes = Vec::new();
        t.write(&mut bytes).unwrap();
        assert_eq!(TokenTable::read(&bytes), Some(t));
        assert_eq!(TokenTable::read(&bytes[..bytes.len() - 1]), None);
        assert_eq!(TokenTable::read(b"garbage"), None);
    }
}
