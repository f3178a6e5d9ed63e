//! The actor pipeline against the sequential step: with teacher_lag 0 it produces the same
//! losses and weights bit for bit (CPU, fp32); a resumed run continues exactly; queues apply
//! backpressure.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::TempDir;
use tch::Device;
use uamt::checkpoint::{self, Snapshot};
use uamt::config::Config;
use uamt::train::{Method, StepReport, Trainer};
use uamt_actors::pipeline::fault::Fault;
use uamt_actors::pipeline::{self, Mode, Outcome, Run};
use uamt_actors::setup::{loader, open_dataset};

/// A tiny config on a synthetic dataset made once per test binary.
fn config(dir: &Path, method: Method, iterations: i64) -> Config {
    let mut c = Config::demo();
    c.data.synth_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pipeline-synth");
    c.data.synth.size = [40, 40, 24];
    c.data.synth.cases = 6;
    c.method.kind = method;
    c.optim.iterations = iterations;
    c.method.consistency_interval = 1;
    c.checkpoint.dir = dir.join("ckpt");
    c.checkpoint.every = 0;
    c.device.threads = 1;
    c.telemetry.listen = String::new();
    // Generate the shared synthetic dataset once, before tests open it concurrently.
    static SYNTH: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    SYNTH.get_or_init(|| {
        open_dataset(&c).unwrap();
    });
    c
}

fn fresh_trainer(c: &Config) -> Trainer {
    Trainer::seeded(&c.model, c.step_config(), Device::Cpu, c.optim.seed).unwrap()
}

/// The sequential reference: `Trainer::step` on the loader's batches.
fn sequential(c: &Config, mut tr: Trainer, to: i64) -> (Trainer, Vec<StepReport>) {
    tch::set_num_threads(1);
    let l = loader(c, open_dataset(c).unwrap()).unwrap();
    let mut reports = Vec::new();
    while tr.iter < to {
        let (images, labels) = l.batch(tr.iter as u64).unwrap();
        let rnd = tr.draw_random(c.optim.seed, &images.size());
        reports.push(tr.step(&images, &labels, &rnd).unwrap().report());
    }
    (tr, reports)
}

fn run_in(c: &Config, tr: Trainer, checkpoints: bool, mode: Mode) -> Outcome {
    try_run(c, tr, checkpoints, mode, None).unwrap()
}

fn try_run(c: &Config, tr: Trainer, checkpoints: bool, mode: Mode, fault: Option<Fault>) -> anyhow::Result<Outcome> {
    let l = loader(c, open_dataset(c).unwrap()).unwrap();
    let mut run = Run::new(c.clone(), Device::Cpu, l, tr);
    run.mode = mode;
    run.checkpoints = checkpoints;
    run.fault = fault;
    pipeline::run(run)
}

fn pipelined(c: &Config, tr: Trainer, checkpoints: bool) -> Outcome {
    run_in(c, tr, checkpoints, Mode::Pipelined)
}

fn assert_same_weights(what: &str, a: &Trainer, b: &Trainer) {
    let pairs = |t: &Trainer| {
        let mut v = t.student.store().named_tensors();
        if let Some(te) = &t.teacher {
            v.extend(te.store().named_tensors().into_iter().map(|(n, t)| (format!("teacher.{n}"), t)));
        }
        v
    };
    let (pa, pb) = (pairs(a), pairs(b));
    assert_eq!(pa.len(), pb.len());
    for ((na, ta), (nb, tb)) in pa.iter().zip(&pb) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{what}: `{na}` differs");
    }
    for ((n, x), (_, y)) in a.opt.buffers().iter().zip(b.opt.buffers()) {
        assert!(x.equal(y), "{what}: momentum `{n}` differs");
    }
}

fn assert_same_reports(what: &str, a: &[StepReport], b: &[StepReport]) {
    assert_eq!(a.len(), b.len(), "{what}: step counts");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x, y, "{what}: iteration {} differs", x.iter);
    }
}

#[test]
fn pipeline_with_teacher_lag_0_equals_the_sequential_loop() {
    let dir = TempDir::new("pipeline-lag0");
    for (method, n) in [(Method::Uamt, 5), (Method::MeanTeacher, 3), (Method::Supervised, 3)] {
        let c = config(&dir, method, n);
        let (seq, seq_reports) = sequential(&c, fresh_trainer(&c), n);
        let out = pipelined(&c, fresh_trainer(&c), false);
        assert_same_reports(&format!("{method:?}"), &seq_reports, &out.reports);
        assert_same_weights(&format!("{method:?}"), &seq, &out.trainer);
        assert!(!out.stopped);
    }
}

#[test]
fn reading_the_numbers_back_every_few_steps_reports_every_step_the_same() {
    // As on a GPU, where the step's scalars stay on the device and come back in one copy every
    // `readback_every` steps (here 4 of 7: one read after step 4, the rest at the end).
    let dir = TempDir::new("pipeline-readback");
    let mut c = config(&dir, Method::Uamt, 7);
    c.telemetry.log_every = 100;
    let every_step = pipelined(&c, fresh_trainer(&c), false);
    c.telemetry.readback_every = 4;
    let batched = pipelined(&c, fresh_trainer(&c), false);
    assert_eq!(batched.reports.len(), 7);
    assert_same_reports("readback_every = 4", &every_step.reports, &batched.reports);
    assert_eq!(batched.reports.iter().map(|r| r.iter).collect::<Vec<_>>(), (0..7).collect::<Vec<_>>());
}

#[test]
fn the_daemons_sequential_mode_equals_the_sequential_step() {
    let dir = TempDir::new("pipeline-seqmode");
    for (method, n) in [(Method::Uamt, 4), (Method::Supervised, 2)] {
        let c = config(&dir, method, n);
        let (seq, seq_reports) = sequential(&c, fresh_trainer(&c), n);
        let out = run_in(&c, fresh_trainer(&c), false, Mode::Sequential);
        assert_same_reports(&format!("{method:?}"), &seq_reports, &out.reports);
        assert_same_weights(&format!("{method:?}"), &seq, &out.trainer);
    }
}

#[test]
fn teacher_lag_1_trains_with_an_older_teacher_the_same_in_both_modes() {
    let dir = TempDir::new("pipeline-lag1");
    let mut c = config(&dir, Method::Uamt, 5);
    c.method.teacher_lag = 1;
    let out = pipelined(&c, fresh_trainer(&c), false);
    assert_eq!(out.reports.len(), 5);
    // The sequential mode with the same lag is the ground truth of the lagged pipeline too.
    let seq_lag = run_in(&c, fresh_trainer(&c), false, Mode::Sequential);
    assert_same_reports("lag 1", &seq_lag.reports, &out.reports);
    assert_same_weights("lag 1", &seq_lag.trainer, &out.trainer);
    // Against lag 0: iterations 0 and 1 see the initial teacher either way (the EMA after step
    // -1 and step -2 are both the weights the run starts with); iteration 2 sees an older one.
    let c0 = config(&dir, Method::Uamt, 5);
    let (_, lag0) = sequential(&c0, fresh_trainer(&c0), 5);
    assert_eq!(lag0[0], out.reports[0]);
    assert_ne!(lag0[1].consistency, out.reports[1].consistency, "iteration 1: lag 0 uses the EMA after step 0");
    assert_ne!(lag0[4].consistency, out.reports[4].consistency);
}

#[test]
fn a_failing_stage_ends_the_run_with_an_error_naming_it() {
    let dir = TempDir::new("pipeline-fault");
    let c = config(&dir, Method::Uamt, 50);
    for (mode, stage) in [(Mode::Pipelined, "teacher"), (Mode::Pipelined, "dispatcher"), (Mode::Sequential, "teacher")]
    {
        let t0 = Instant::now();
        let fault = Some(Fault { stage: stage.into(), iteration: 2 });
        let err = match try_run(&c, fresh_trainer(&c), false, mode, fault) {
            Ok(_) => panic!("{mode:?}/{stage}: the run should fail"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(&format!("the {stage} stage")) || err.contains(&format!("in the {stage} stage")), "{err}");
        assert!(err.contains("injected fault"), "{mode:?}: the cause, not a consequence: {err}");
        assert!(t0.elapsed() < Duration::from_secs(30), "{mode:?}/{stage} took {:?}", t0.elapsed());
    }
}

#[test]
fn a_stop_request_ends_with_a_final_checkpoint() {
    let dir = TempDir::new("pipeline-stop");
    let mut c = config(&dir, Method::Uamt, 1000);
    c.checkpoint.every = 0;
    for mode in [Mode::Pipelined, Mode::Sequential] {
        let _ = std::fs::remove_dir_all(&c.checkpoint.dir);
        let l = loader(&c, open_dataset(&c).unwrap()).unwrap();
        let mut run = Run::new(c.clone(), Device::Cpu, l, fresh_trainer(&c));
        run.mode = mode;
        let controls = run.controls.clone();
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            controls.request_stop("test");
        });
        let out = pipeline::run(run).unwrap();
        stopper.join().unwrap();
        assert!(out.stopped, "{mode:?}");
        let steps = out.trainer.iter;
        assert!(steps > 0 && steps < 1000, "{mode:?}: {steps} steps");
        let cks = checkpoint::list(&c.checkpoint.dir);
        assert_eq!(cks.last().map(|c| c.0), Some(steps), "{mode:?}: the final checkpoint holds the last step");
        let snap = Snapshot::read(&cks.last().unwrap().1).unwrap();
        assert!(snap.teacher.is_some());
    }
}

#[test]
fn resuming_from_a_checkpoint_continues_exactly() {
    let dir = TempDir::new("pipeline-resume");
    let mut c = config(&dir, Method::Uamt, 6);
    c.checkpoint.every = 3;
    c.checkpoint.keep = 5;
    let whole = pipelined(&c, fresh_trainer(&c), true);
    let cks = checkpoint::list(&c.checkpoint.dir);
    assert_eq!(cks.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![3, 6]);
    // A new process would build a fresh trainer and restore the checkpoint into it.
    let mut tr = fresh_trainer(&c);
    let snap = Snapshot::read(&cks[0].1).unwrap();
    snap.restore_into(&mut tr, &cks[0].1).unwrap();
    assert_eq!(tr.iter, 3);
    let resumed = pipelined(&c, tr, false);
    assert_same_reports("resumed", &whole.reports[3..], &resumed.reports);
    assert_same_weights("resumed", &whole.trainer, &resumed.trainer);
    // The sequential mode resumes from the pipeline's checkpoint to the same end.
    let mut tr = fresh_trainer(&c);
    snap.restore_into(&mut tr, &cks[0].1).unwrap();
    let resumed_seq = run_in(&c, tr, false, Mode::Sequential);
    assert_same_reports("resumed sequentially", &whole.reports[3..], &resumed_seq.reports);
    assert_same_weights("resumed sequentially", &whole.trainer, &resumed_seq.trainer);
    // The checkpoint holds the config it ran with.
    assert_eq!(Config::from_toml(&snap.config, Path::new("ckpt")).unwrap(), c);
}

#[test]
fn a_full_queue_blocks_its_producer_until_the_consumer_takes() {
    let (tx, rx) = uamt_actors::queue::bounded::<u32>("test", 1);
    tx.send(1).unwrap();
    let t = std::thread::spawn(move || {
        let blocked = tx.send(2).unwrap(); // waits for the consumer
        blocked
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(rx.recv().unwrap().0, 1);
    let blocked = t.join().unwrap();
    assert!(blocked >= 0.15, "the producer should have waited ~0.2 s, waited {blocked}");
    assert_eq!(rx.recv().unwrap().0, 2);
    assert!(rx.recv().is_err(), "closed once the producer is gone");
}
