//! `uamt eval` given hostile inputs: a foreign checkpoint whose stored config points the synthetic
//! dataset somewhere (never generated), and a dataset whose test ids try to lead `--out` outside
//! its folder (refused before anything is written).

#[path = "../../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Output};
use support::TempDir;
use tch::Device;
use uamt::checkpoint::Snapshot;
use uamt::config::Config;
use uamt::data::dataset::TestEntry;
use uamt::data::synth::{write_synth, SynthConfig};
use uamt::data::Manifest;
use uamt::train::Trainer;

fn eval(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_uamt")).arg("eval").args(args).output().expect("run uamt eval")
}

/// A checkpoint of an untrained demo model whose stored config is `config`.
fn checkpoint(dir: &Path, config: &Config) -> std::path::PathBuf {
    let tr = Trainer::seeded(&config.model, config.step_config(), Device::Cpu, 5).unwrap();
    Snapshot::of_trainer(&tr, 5, &config.to_toml()).write_atomic(&dir.join("ck")).unwrap()
}

#[test]
fn a_foreign_checkpoint_never_generates_its_synthetic_dataset() {
    let dir = TempDir::new("fault-eval-synth");
    let target = dir.join("elsewhere");
    let mut config = Config::demo();
    config.data.dataset = Default::default();
    config.data.synth_dir = target.join("synth");
    let ck = checkpoint(&dir, &config);
    let out = eval(&["--checkpoint", ck.to_str().unwrap(), "--device", "cpu", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("give --dataset"), "{stderr}");
    assert!(!target.exists(), "eval generated a dataset at {}", target.display());
}

#[test]
fn eval_out_never_writes_outside_its_folder() {
    let dir = TempDir::new("fault-eval-out");
    let data = dir.join("data");
    let synth = SynthConfig { cases: 1, labelled: 1, test: 1, size: [32, 32, 16], ..SynthConfig::default() };
    write_synth(&data, &synth, false).unwrap();
    let mut m = Manifest::read(&data).unwrap();
    let TestEntry::Case(c) = &mut m.test[0] else { panic!("synth writes test cases as objects") };
    c.id = "../escaped".into();
    m.write(&data).unwrap();
    let ck = checkpoint(&dir, &Config::demo());
    let out_dir = dir.join("deep/out");
    let out = eval(&[
        "--checkpoint",
        ck.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("plain name"), "{stderr}");
    let escaped: Vec<_> = std::fs::read_dir(dir.join("deep"))
        .map(|d| d.flatten().map(|e| e.file_name()).filter(|n| n.to_string_lossy().starts_with("escaped")).collect())
        .unwrap_or_default();
    assert!(escaped.is_empty(), "{escaped:?}");
}
