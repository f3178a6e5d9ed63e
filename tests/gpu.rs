//! The C++ shim (src/shim/uamt_torch.cpp) through `uamt::gpu`: bf16 autocast really changes the
//! arithmetic and is scoped to its guard, a bf16 training step follows the fp32 one, TF32 is
//! switched, and CUDA streams are a no-op on the CPU and a clear error where there is no GPU.
//! (What streams do on a GPU is checked by ops/gpu-check, on a machine that has one.)

use tch::{Device, Kind, Tensor};
use uamt::gpu::Precision;
use uamt::gpu::{self, Autocast, OwnStream, Ready};
use uamt::model::{Dropout, Init, VNet, VNetConfig};
use uamt::rng;
use uamt::train::{StepConfig, Trainer};

fn tiny() -> VNetConfig {
    VNetConfig { n_filters: 4, ..VNetConfig::default() }
}

fn input(b: i64) -> Tensor {
    rng::normal(rng::key(3, &[b as u64]), &[b, 1, 32, 32, 16], Device::Cpu)
}

#[test]
fn bf16_autocast_is_scoped_nests_and_changes_the_arithmetic() {
    assert!(!gpu::autocast_enabled(Device::Cpu));
    {
        let _outer = Autocast::bf16(Device::Cpu).unwrap();
        assert!(gpu::autocast_enabled(Device::Cpu));
        {
            let _inner = Autocast::bf16(Device::Cpu).unwrap();
            let a = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
            assert_eq!(a.matmul(&a).kind(), Kind::BFloat16, "matmul under autocast runs in bf16");
        }
        assert!(gpu::autocast_enabled(Device::Cpu), "leaving the inner guard keeps the outer one");
    }
    assert!(!gpu::autocast_enabled(Device::Cpu), "leaving the outer guard restores fp32");
    // Another thread never sees this thread's autocast.
    let _g = Autocast::bf16(Device::Cpu).unwrap();
    assert!(!std::thread::spawn(|| gpu::autocast_enabled(Device::Cpu)).join().unwrap());
}

#[test]
fn a_bf16_network_returns_float_logits_close_to_fp32_but_not_equal() {
    let mut net = VNet::with_init(&tiny(), Device::Cpu, Init::Seeded(5)).unwrap();
    let x = input(2);
    let fp32 = net.forward_with(&x, false, Dropout::Random).unwrap();
    net.set_bf16(true);
    let bf16 = net.forward_with(&x, false, Dropout::Random).unwrap();
    assert_eq!(bf16.kind(), Kind::Float);
    let diff = (&bf16 - &fp32).abs().max().double_value(&[]);
    let scale = fp32.abs().max().double_value(&[]);
    assert!(diff > 0.0, "bf16 autocast did not change the arithmetic");
    assert!(diff < 0.05 * scale, "bf16 logits too far from fp32: {diff} against {scale}");
    assert!(!gpu::autocast_enabled(Device::Cpu), "the forward pass leaves autocast as it found it");
}

#[test]
fn a_bf16_training_step_follows_the_fp32_step() {
    let x = input(4);
    let g = |n: i64| (Tensor::arange(n, (Kind::Float, Device::Cpu)) - (n as f64 - 1.0) / 2.0) / (n as f64 / 4.0);
    let r2 =
        g(32).reshape([32, 1, 1]).square() + g(32).reshape([1, 32, 1]).square() + g(16).reshape([1, 1, 16]).square();
    let lab = r2.lt(1.5).to_kind(Kind::Int64);
    let labels = Tensor::stack(&[lab.shallow_clone(), lab], 0);
    let run = |p: Precision| {
        let mut tr = Trainer::seeded(
            &tiny(),
            {
                let mut c = StepConfig::default();
                c.method.consistency_interval = 1;
                c
            },
            Device::Cpu,
            9,
        )
        .unwrap();
        tr.set_precision(p).unwrap();
        let mut losses = Vec::new();
        for _ in 0..2 {
            let rnd = tr.draw_random(4, &x.size());
            losses.push(tr.step(&x, &labels, &rnd).unwrap().report().loss);
        }
        let w = tr.student.store().get("block_one.conv.0.weight").unwrap();
        assert_eq!(w.kind(), Kind::Float, "weights stay fp32 under autocast");
        (losses, w.copy())
    };
    let (l32, w32) = run(Precision::Fp32);
    let (l16, w16) = run(Precision::Bf16);
    for (a, b) in l32.iter().zip(&l16) {
        assert!((a - b).abs() < 0.02 * a.abs(), "bf16 loss {b} vs fp32 {a}");
    }
    assert!(l32 != l16, "bf16 gave bit-identical losses: autocast not applied");
    assert!(w32.allclose(&w16, 1e-2, 1e-3, false), "bf16 update strays from fp32");
}

#[test]
fn tf32_is_switched_process_wide() {
    gpu::set_tf32(true).unwrap();
    assert!(gpu::tf32_enabled());
    gpu::set_tf32(false).unwrap();
    assert!(!gpu::tf32_enabled());
}

#[test]
fn streams_are_a_no_op_on_the_cpu_and_a_clear_error_without_a_gpu() {
    gpu::enable_streams(true);
    let s = OwnStream::new(Device::Cpu).unwrap();
    assert!(s.stream().is_none());
    let t = Tensor::ones([3], (Kind::Float, Device::Cpu));
    Ready::now(Device::Cpu).unwrap().wait(Device::Cpu, [&t]).unwrap();
    if uamt::device::cuda_device_count() == 0 {
        let err = OwnStream::new(Device::Cuda(0)).unwrap_err().to_string();
        assert!(err.contains("CUDA stream"), "{err}");
    } else {
        // A GPU: the guard gives this thread a stream other than the default one, and a tensor
        // handed over with Ready arrives intact.
        let own = OwnStream::new(Device::Cuda(0)).unwrap();
        let stream = own.stream().expect("a stream on CUDA");
        assert_eq!(uamt::gpu::Stream::current(Device::Cuda(0)).unwrap(), Some(stream));
        let x = Tensor::arange(1 << 20, (Kind::Float, Device::Cuda(0))) * 2.0;
        let ready = Ready::now(Device::Cuda(0)).unwrap();
        let sum = std::thread::spawn(move || {
            let _other = OwnStream::new(Device::Cuda(0)).unwrap();
            ready.wait(Device::Cuda(0), [&x]).unwrap();
            x.sum(Kind::Double).double_value(&[])
        })
        .join()
        .unwrap();
        let n = (1u64 << 20) as f64;
        assert_eq!(sum, n * (n - 1.0));
    }
    gpu::enable_streams(false);
}
