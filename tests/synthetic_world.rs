//! The shipped synthetic world is exactly what the generator makes from its
//! seed, and the `synth` stage writes the same files.

use std::path::Path;

use posttrain::data::synth::{self, SynthConfig, FILES};

#[test]
fn shipped_files_regenerate_byte_identical_from_seed_0() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/assistant");
    let dir = tempfile::tempdir().unwrap();
    let mut data = synth::generate(&SynthConfig::default(), 0).unwrap();
    synth::write(&mut data, dir.path()).unwrap();
    for file in FILES {
        let a = blake3::hash(&std::fs::read(shipped.join(file)).unwrap());
        let b = blake3::hash(&std::fs::read(dir.path().join(file)).unwrap());
        assert_eq!(a, b, "{file} differs from a fresh generation: run `posttrain data synth --out datasets/assistant`");
    }
}

#[test]
fn comparison_labels_agree_with_the_gold_labeler_except_for_noise() {
    let cfg = SynthConfig {
        label_noise: 0.2,
        comparisons: 3000,
        ..SynthConfig::default()
    };
    let data = synth::generate(&cfg, 4).unwrap();
    let c = &data.comparisons;
    let chosen = c.column("chosen_gold").unwrap().f64().unwrap();
    let rejected = c.column("rejected_gold").unwrap().f64().unwrap();
    let flipped = c.column("label_flipped").unwrap().bool().unwrap();
    let mut agree = 0;
    for i in 0..c.height() {
        let gold_prefers_chosen = chosen.get(i).unwrap() > rejected.get(i).unwrap();
        assert_eq!(gold_prefers_chosen, !flipped.get(i).unwrap(), "row {i}");
        agree += usize::from(gold_prefers_chosen);
    }
    let rate = agree as f64 / c.height() as f64;
    assert!(
        (rate - 0.8).abs() < 0.03,
        "agreement {rate} should be near 1 - label_noise"
    );
}
