//! `posttrain verify`: rehash every file of store entries (blake3) against
//! their manifests; a corrupt entry is moved out of place (as gc deletes),
//! so the next run rebuilds it.

use std::collections::BTreeSet;
use std::io;

use super::Store;

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub checked: usize,
    pub bytes: u64,
    /// (key, what is wrong with it).
    pub corrupt: Vec<(String, String)>,
    /// Corrupt entries another run is building now, left alone.
    pub busy: Vec<String>,
}

/// What is wrong with the entry `key`, rehashing every listed file.
pub fn check_entry(store: &Store, key: &str) -> Result<u64, String> {
    let manifest = store.checked_manifest(key)?;
    let dir = store.entry_dir(key);
    let mut bytes = 0;
    for out in &manifest.outputs {
        let hash = crate::plan::hash::hash_file_contents(&dir.join(&out.path), out.bytes)
            .map_err(|e| format!("`{}`: {e}", out.path))?;
        if hash != out.blake3 {
            return Err(format!(
                "`{}` has blake3 {}, its manifest says {}",
                out.path,
                &hash[..12],
                &out.blake3[..12.min(out.blake3.len())]
            ));
        }
        bytes += out.bytes;
    }
    Ok(bytes)
}

/// Verify `keys` (those present in the store); with `remove`, unpublish
/// the corrupt ones.
pub fn verify(store: &Store, keys: &BTreeSet<String>, remove: bool) -> io::Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let present = store.keys()?;
    for key in keys.intersection(&present) {
        report.checked += 1;
        match check_entry(store, key) {
            Ok(bytes) => report.bytes += bytes,
            Err(problem) => {
                if remove {
                    let Some(_lock) = super::lock::try_lock_key(&store.locks_dir(), key)? else {
                        report.busy.push(key.clone());
                        continue;
                    };
                    store.unpublish(key)?;
                }
                report.corrupt.push((key.clone(), problem));
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{BuiltBy, Manifest};

    fn publish(store: &Store, key: &str, data: &[u8]) {
        let staging = store.begin(key).unwrap();
        std::fs::write(staging.dir.join("data.bin"), data).unwrap();
        let manifest = Manifest {
            identity: crate::plan::StageIdentity {
                key: key.into(),
                kind: "synth".into(),
                recipe_version: 1,
                seed: 0,
                settings: serde_json::json!({}),
                upstream: vec![],
                datasets: vec![],
            },
            built_by: BuiltBy {
                experiment: "e".into(),
                stage: "s".into(),
            },
            started: String::new(),
            finished: String::new(),
            duration_s: 0.0,
            metrics: Default::default(),
            outputs: vec![],
        };
        store.publish(staging, manifest).unwrap();
    }

    #[test]
    fn a_missing_or_truncated_file_is_a_miss_and_a_flipped_byte_fails_verify() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        for k in ["a", "b", "c"] {
            publish(&store, k, b"hello world");
        }
        std::fs::remove_file(store.entry_dir("a").join("data.bin")).unwrap();
        std::fs::write(store.entry_dir("b").join("data.bin"), b"hello").unwrap();
        std::fs::write(store.entry_dir("c").join("data.bin"), b"hellO world").unwrap();
        // The cheap check on every hit: existence and size.
        assert!(store.manifest("a").is_none());
        assert!(store.problem("a").unwrap().contains("data.bin"));
        assert!(store.manifest("b").is_none());
        assert!(store.problem("b").unwrap().contains("has 5 bytes"));
        assert!(
            store.manifest("c").is_some(),
            "same size: only verify sees it"
        );
        let keys: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
        let report = verify(&store, &keys, true).unwrap();
        assert_eq!(report.corrupt.len(), 3, "{report:?}");
        assert!(report.corrupt[2].1.contains("blake3"), "{report:?}");
        assert!(
            store.keys().unwrap().is_empty(),
            "corrupt entries moved out"
        );
    }

    #[test]
    fn unpublish_leaves_nothing_at_the_key_and_gc_finishes_trash() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        publish(&store, "a", b"x");
        // What a gc killed between its rename and its delete leaves.
        let aside = store.move_to_trash(&store.entry_dir("a"), "a").unwrap();
        assert!(aside.exists());
        assert!(
            store.keys().unwrap().is_empty(),
            "a trashed entry is not an entry"
        );
        let report = store.gc(&BTreeSet::new(), None, false, false).unwrap();
        assert_eq!(report.trash, 1);
        assert!(!aside.exists());
    }
}
