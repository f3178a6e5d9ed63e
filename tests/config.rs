//! Every config under config/ parses and validates; unknown keys and impossible values are
//! refused with the key named; the demo file equals the built-in demo.

mod support;

use std::path::Path;
use support::repo;
use uamt::config::Config;
use uamt::train::Method;

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
        assert_eq!(c.data.patch, [112, 112, 80]);
        assert_eq!(c.model.n_filters, 16);
        assert_eq!(c.optim.iterations, 6000);
        assert_eq!(
            c.step_config(),
            uamt::train::StepConfig { method, ..Default::default() },
            "{file} differs from the recipe"
        );
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
    ] {
        let err = Config::from_toml(text, Path::new("c.toml")).unwrap_err().to_string();
        assert!(err.contains(key), "`{text}` gave `{err}`, which does not name {key}");
    }
    // bf16 runs anywhere (autocast on the CPU too); tf32 where the device may be a GPU.
    assert!(Config::from_toml("[device]\ndevice = \"cpu\"\nprecision = \"bf16\"", Path::new("c.toml")).is_ok());
    assert!(Config::from_toml("[device]\ndevice = \"auto\"\nprecision = \"tf32\"", Path::new("c.toml")).is_ok());
    let err = Config::from_toml("[optim]\niterations = \"many\"", Path::new("c.toml")).unwrap_err().to_string();
    assert!(err.contains("iterations") || err.contains("line 2"), "{err}");
}

#[test]
fn a_config_round_trips_through_toml() {
    let c = Config::demo();
    assert_eq!(Config::from_toml(&c.to_toml(), Path::new("rt.toml")).unwrap(), c);
}

#[test]
fn a_cuda_device_is_checked_at_start_and_the_cuda_backend_is_linked() {
    let mut d = uamt::config::DeviceConfig { device: "cuda".into(), ..Default::default() };
    let gpus = tch::Cuda::device_count();
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
