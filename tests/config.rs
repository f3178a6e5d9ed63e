//! Every config under config/ parses and validates; unknown keys and impossible values are
//! refused with the key named (NaN, infinities and sizes past their bounds too); the demo file
//! equals the built-in demo; parsing asks no hardware.

mod support;

use std::path::Path;
use support::repo;
use uamt::config::Config;
use uamt::train::{Method, StepConfig};

#[test]
fn every_file_in_config_parses_and_validates() {
    let mut n = 0;
    for e in std::fs::read_dir(repo().join("config")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            Config::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 4, "expected the demo and three LA configs, found {n}");
}

#[test]
fn the_la_configs_cover_the_three_methods_with_the_recipe() {
    for (file, method) in [
        ("la-uamt.toml", Method::Uamt),
        ("la-mean-teacher.toml", Method::MeanTeacher),
        ("la-supervised.toml", Method::Supervised),
    ] {
        let c = Config::load(&repo().join("config").join(file)).unwrap();
        assert_eq!(c.method.kind, method, "{file}");
        assert_eq!(c.data.loader.patch, [112, 112, 80]);
        assert_eq!((c.eval.window.patch, c.eval.window.stride), ([112, 112, 80], [18, 18, 4]));
        assert_eq!(c.model.n_filters, 16);
        assert_eq!(c.optim.iterations, 6000);
        assert_eq!(c.step_config(), StepConfig::of(method), "{file} differs from the recipe");
    }
}

#[test]
fn the_demo_file_is_the_built_in_demo() {
    let file = Config::load(&repo().join("config/demo.toml")).unwrap();
    assert_eq!(file, Config::demo());
}

#[test]
fn an_unknown_key_is_refused_with_its_name() {
    let err = Config::from_toml("[optim]\niterations = 5\nlearning_rate = 0.1\n", Path::new("x.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("learning_rate") && err.contains("x.toml"), "{err}");
    let err = Config::from_toml("[optimizer]\n", Path::new("y.toml")).unwrap_err().to_string();
    assert!(err.contains("optimizer"), "{err}");
}

#[test]
fn impossible_values_are_refused_with_the_key_named() {
    for (text, key) in [
        ("[data]\npatch = [112, 100, 80]", "data.patch"),
        ("[method]\nmc_passes = 7", "method.mc_passes"),
        ("[method]\nema_decay = 1.5", "method.ema_decay"),
        ("[optim]\nbase_lr = -1.0", "optim.base_lr"),
        ("[queues]\nbatches = 0", "queues.batches"),
        ("[method]\nteacher_lag = 1\n[queues]\nparams = 1", "queues.params"),
        ("[device]\ndevice = \"tpu\"", "device.device"),
        ("[telemetry]\nlisten = \"localhost\"", "telemetry.listen"),
        ("[checkpoint]\nkeep = 0", "checkpoint.keep"),
        ("[device]\ndevice = \"cpu\"\nprecision = \"tf32\"", "device.precision"),
        ("[device]\nprecision = \"fp16\"", "device.precision"),
        ("[telemetry]\nreadback_every = -1", "telemetry.readback_every"),
        ("[distributed]\ntimeout_s = 0", "distributed.timeout_s"),
        ("[distributed]\nbucket_mb = -1", "distributed.bucket_mb"),
        ("[distributed]\ncheck_every = -1", "distributed.check_every"),
        ("[distributed]\nworld_size = 0", "distributed.world_size"),
        ("[distributed]\nworld_size = 2\nrank = 2", "distributed.rank"),
        ("[distributed]\nmaster_port = 0", "distributed.master_port"),
        ("[distributed]\nbackend = \"nccl\"", "backend"),
        ("[distributed]\nranks = 2", "ranks"),
        ("[telemetry]\ntls_cert_file = \"c.pem\"", "telemetry.tls_key_file"),
        ("[telemetry]\ntls_key_file = \"k.pem\"", "telemetry.tls_cert_file"),
        ("[telemetry]\ncontrol_token = \"secret\"", "control_token"),
        ("[rank]\nevery = -1", "rank.every"),
        ("[rank]\nmc_passes = 1", "rank.mc_passes"),
        ("[rank]\nmc_passes = 65", "rank.mc_passes"),
        ("[rank]\nband = -0.5", "rank.band"),
        ("[rank]\nband = nan", "rank.band"),
        ("[rank]\ntop = 0", "rank.top"),
        ("[rank]\nevery = 10\ndir = \"\"", "rank.dir"),
        ("[rank]\nscore = \"variance\"", "score"),
    ] {
        let err = Config::from_toml(text, Path::new("c.toml")).unwrap_err().to_string();
        assert!(err.contains(key), "`{text}` gave `{err}`, which does not name {key}");
    }
    // bf16 runs anywhere (autocast on the CPU too); tf32 where the device may be a GPU.
    assert!(Config::from_toml("[device]\ndevice = \"cpu\"\nprecision = \"bf16\"", Path::new("c.toml")).is_ok());
    assert!(Config::from_toml("[device]\ndevice = \"auto\"\nprecision = \"tf32\"", Path::new("c.toml")).is_ok());
    let err = Config::from_toml("[optim]\niterations = \"many\"", Path::new("c.toml")).unwrap_err().to_string();
    assert!(err.contains("iterations") || err.contains("line 2"), "{err}");
    // Every score by name, and ranking off by default.
    for score in ["entropy", "bald", "entropy_fg", "bald_fg"] {
        let c = Config::from_toml(&format!("[rank]\nevery = 5\nscore = \"{score}\""), Path::new("c.toml")).unwrap();
        assert_eq!(c.rank.score.as_str(), score);
    }
    assert_eq!(Config::default().rank.every, 0);
}

#[test]
fn a_config_round_trips_through_toml() {
    let c = Config::demo();
    assert_eq!(Config::from_toml(&c.to_toml(), Path::new("rt.toml")).unwrap(), c);
}

#[test]
fn a_cuda_device_is_checked_at_start_and_the_cuda_backend_is_linked() {
    let mut d = uamt::config::DeviceConfig { device: "cuda".into(), ..Default::default() };
    let gpus = uamt::device::cuda_device_count();
    match d.resolve() {
        Ok(dev) => assert!(gpus > 0 && dev == tch::Device::Cuda(0)),
        Err(e) => assert!(gpus == 0 && e.to_string().contains("device.device"), "{e}"),
    }
    d.device = format!("cuda:{gpus}");
    assert!(d.resolve().unwrap_err().to_string().contains("CUDA device"));
    // Where libtorch has a CUDA backend (the torch wheels), the build links it although nothing
    // calls it directly: without it a CUDA tensor fails with "Could not run ... 'CUDA' backend"
    // even on a GPU machine; with it, a machine without a GPU says so instead.
    let r = tch::Tensor::f_zeros([1], (tch::Kind::Float, tch::Device::Cuda(0)));
    if cfg!(libtorch_cuda) {
        match r {
            Ok(_) => assert!(gpus > 0),
            Err(e) => assert!(gpus == 0 && !e.to_string().contains("Could not run"), "CUDA backend not linked: {e}"),
        }
    } else {
        assert!(r.is_err() && gpus == 0, "a libtorch without libtorch_cuda.so made a CUDA tensor");
    }
}

/// The error of `text`, which must be refused.
fn refused(text: &str) -> String {
    match Config::from_toml(text, Path::new("h.toml")) {
        Ok(c) => panic!("`{text}` was accepted: {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn nan_and_infinity_are_refused_for_every_float_key() {
    for (section, key) in [
        ("model", "dropout_p"),
        ("method", "noise_std"),
        ("method", "noise_clip"),
        ("method", "consistency"),
        ("method", "consistency_rampup"),
        ("method", "ema_decay"),
        ("optim", "base_lr"),
        ("optim", "lr_gamma"),
        ("optim", "momentum"),
        ("optim", "weight_decay"),
        ("distributed", "timeout_s"),
        ("distributed", "bucket_mb"),
    ] {
        for v in ["nan", "inf", "-inf"] {
            let err = refused(&format!("[{section}]\n{key} = {v}\n"));
            assert!(err.contains(&format!("{section}.{key}")), "{section}.{key} = {v} gave `{err}`");
        }
    }
    for v in ["nan", "inf"] {
        let err = refused(&format!("[data.synth]\nspacing = [1.0, {v}, 1.0]\n"));
        assert!(err.contains("data.synth.spacing"), "{err}");
    }
    // A synthetic spacing counts only when the synthetic data is used.
    assert!(Config::from_toml("[data]\ndataset = \"d\"\n[data.synth]\nspacing = [1.0, nan, 1.0]", Path::new("h.toml"))
        .is_ok());
}

#[test]
fn configs_of_earlier_versions_with_queues_teacher_params_still_parse() {
    let c = Config::from_toml("[queues]\nteacher_params = 2\n", std::path::Path::new("old.toml")).unwrap();
    assert_eq!(c.queues.params, Config::default().queues.params);
    assert!(!c.to_toml().contains("teacher_params"), "not written any more");
}

#[test]
fn sizes_past_their_bounds_are_refused_by_key() {
    for (text, key) in [
        ("[queues]\nbatches = 100000000000000", "queues.batches"),
        ("[queues]\nteacher = 4097", "queues.teacher"),
        ("[queues]\nguidance = 100000", "queues.guidance"),
        ("[queues]\nparams = 100000", "queues.params"),
        ("[queues]\nloader_workers = 65", "queues.loader_workers"),
        ("[model]\nn_filters = 257", "model.n_filters"),
        ("[model]\nn_classes = 100000", "model.n_classes"),
        ("[method]\nmc_passes = 66", "method.mc_passes"),
        ("[method]\nmc_passes = 8\nmc_repeats = 100", "method.mc_repeats"),
        ("[data]\npatch = [1040, 112, 80]", "data.patch"),
        ("[data]\nlabelled_bs = 100000", "data.labelled_bs"),
        ("[data.synth]\nsize = [100000, 48, 32]", "data.synth.size"),
        ("[data.synth]\ncases = 100000000", "data.synth.cases"),
        ("[eval]\npatch = [2048, 112, 80]", "eval.patch"),
        ("[eval]\nbatch_size = 100000", "eval.batch_size"),
        ("[device]\nthreads = 100000", "device.threads"),
        ("[device]\npass_workers = 257", "device.pass_workers"),
        ("[device]\nlayout = \"nhwc\"", "layout"),
    ] {
        let err = refused(text);
        assert!(err.contains(key), "`{text}` gave `{err}`, which does not name {key}");
    }
    // The bounds themselves are allowed.
    let ok = "[queues]\nbatches = 4096\nloader_workers = 64\n[model]\nn_filters = 256\n[method]\nmc_passes = 64";
    Config::from_toml(ok, Path::new("h.toml")).unwrap();
}

#[test]
fn the_eval_stride_may_not_exceed_the_window() {
    let err = refused("[eval]\npatch = [112, 112, 80]\nstride = [18, 113, 4]");
    assert!(err.contains("eval.stride"), "{err}");
    let err = refused("[eval]\nstride = [0, 18, 4]");
    assert!(err.contains("eval.stride"), "{err}");
    let c = Config::from_toml("[eval]\npatch = [32, 32, 16]\nstride = [32, 32, 16]", Path::new("h.toml")).unwrap();
    assert_eq!(c.eval.window.stride, [32, 32, 16]);
}

#[test]
fn the_eval_blend_is_constant_unless_asked_and_refused_by_key_when_unknown() {
    use uamt::eval::Blend;
    assert_eq!(Config::demo().eval.window.blend, Blend::Constant, "the reference's average by default");
    assert!(!Config::demo().to_toml().contains("blend"), "the default is left out of written configs");
    let c = Config::from_toml("[eval]\nblend = \"gaussian\"", Path::new("h.toml")).unwrap();
    assert_eq!(c.eval.window.blend, Blend::Gaussian);
    assert_eq!(Config::from_toml(&c.to_toml(), Path::new("rt.toml")).unwrap(), c);
    let err = refused("[eval]\nblend = \"mean\"");
    assert!(err.contains("blend") && err.contains("gaussian"), "{err}");
}

#[test]
fn an_empty_checkpoint_dir_is_refused() {
    let err = refused("[checkpoint]\ndir = \"\"");
    assert!(err.contains("checkpoint.dir"), "{err}");
}

#[test]
fn unknown_keys_are_refused_in_the_sections_that_embed_component_configs() {
    for (text, key) in [
        ("[data]\npatch_size = [32, 32, 16]", "patch_size"),
        ("[data.synth]\nvolumes = 3", "volumes"),
        ("[eval]\nwindow = [32, 32, 16]", "window"),
        ("[model]\nhas_dropout = false", "has_dropout"),
        ("[method]\nmax_iter = 5", "max_iter"),
        ("[rank]\nevery_n = 5", "every_n"),
    ] {
        let err = refused(text);
        assert!(err.contains(key), "`{text}` gave `{err}`, which does not name {key}");
    }
}

#[test]
fn a_config_naming_a_gpu_parses_on_any_machine_and_is_checked_at_start() {
    // Parsing is static: no CUDA device is asked for (a checkpoint trained on a GPU must be
    // readable on a CPU machine); resolving at start-up is what refuses a missing GPU.
    let c = Config::from_toml("[device]\ndevice = \"cuda:7\"\nprecision = \"tf32\"", Path::new("g.toml")).unwrap();
    assert_eq!(c.device.device, "cuda:7");
    let gpus = uamt::device::cuda_device_count();
    if gpus <= 7 {
        assert!(c.device.resolve().unwrap_err().to_string().contains("device.device"));
    }
}

#[test]
fn teacher_passes_at_once_and_the_layout_follow_the_device_and_the_width() {
    use uamt::config::{DeviceConfig, Layout};
    use uamt::train::PassWorkers;
    let cpu =
        |threads, pass_workers| DeviceConfig { device: "cpu".into(), threads, pass_workers, ..Default::default() };
    // Automatic: one single-threaded pass per thread of the stage.
    assert_eq!(cpu(2, 0).pass_workers(false), PassWorkers { workers: 2, threads: 1 });
    assert_eq!(cpu(4, 0).pass_workers(true), PassWorkers { workers: 4, threads: 1 });
    assert_eq!(cpu(1, 0).pass_workers(false), PassWorkers::ONE);
    // Asked for: the stage's threads shared out.
    assert_eq!(cpu(4, 2).pass_workers(false), PassWorkers { workers: 2, threads: 2 });
    assert_eq!(cpu(2, 1).pass_workers(false), PassWorkers::ONE);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let auto = cpu(0, 0).pass_workers(false);
    assert_eq!(auto.workers.max(1), cores, "every core of the sequential loop's stage");
    // Channels-last from 8 filters on a CPU unless the config says otherwise.
    let dev = tch::Device::Cpu;
    assert!(cpu(0, 0).channels_last(8, dev) && cpu(0, 0).channels_last(16, dev));
    assert!(!cpu(0, 0).channels_last(4, dev));
    assert!(!cpu(0, 0).channels_last(16, tch::Device::Cuda(0)), "not measured on a GPU: the default layout");
    // On a GPU (or a GPU config on a machine without one) the passes stay on the stage's thread
    // and stream, whatever the config asks.
    let gpu = DeviceConfig { device: "cuda:0".into(), pass_workers: 4, threads: 4, ..Default::default() };
    assert_eq!(gpu.pass_workers(false), PassWorkers::ONE);
    let with = |layout| DeviceConfig { layout, ..cpu(0, 0) };
    assert!(with(Layout::ChannelsLast).channels_last(4, dev) && !with(Layout::Contiguous).channels_last(16, dev));
    let c = Config::from_toml("[device]\nlayout = \"channels_last\"\npass_workers = 3", Path::new("h.toml")).unwrap();
    assert_eq!((c.device.layout, c.device.pass_workers), (Layout::ChannelsLast, 3));
}
