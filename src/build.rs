//! Build script of both packages (the core library's and, through `build = "../src/build.rs"`,
//! the actors crate's; kept under src/ so the top level stays as agreed).
//!
//! - Embeds libtorch's library directory as an rpath in every binary, test and bench, so nothing
//!   has to set LD_LIBRARY_PATH.
//! - In the core library, compiles `src/shim/uamt_torch.cpp` (bf16 autocast, TF32, CUDA streams
//!   and events: what tch does not expose), `src/shim/uamt_dist.cpp` (c10d's TCPStore and
//!   Gloo process group for data-parallel training) and `src/shim/uamt_kernels.cpp` (a fused
//!   CPU BatchNorm + ReLU for passes without autograd) against libtorch's headers.
//! - Does not link libtorch's CUDA backend (`libtorch_cuda.so`, which the `torch` wheels have):
//!   nothing in our code references its symbols, and loading it with the CUDA libraries it needs
//!   costs every command 0.4 s and 470 MB, `uamt --version` included. `uamt::device::cuda_backend`
//!   loads it at run time when a CUDA device is asked for. The `libtorch_cuda` cfg says whether
//!   the libtorch built against has it (the tests use it).
use std::path::Path;

fn main() {
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else { return };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    if std::env::var("CARGO_PKG_NAME").as_deref() == Ok("uamt") {
        shim(Path::new(&dir));
    }
    if Path::new(&dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-cfg=libtorch_cuda");
    }
    println!("cargo::rustc-check-cfg=cfg(libtorch_cuda)");
}

/// Builds the C++ shim into a static library linked into the core library (and so into
/// everything that uses it).
fn shim(lib: &Path) {
    println!("cargo:rerun-if-changed=src/build.rs");
    println!("cargo:rerun-if-changed=src/shim");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let include = lib.parent().expect("libtorch's lib dir has a parent").join("include");
    // libtorch 2.x wheels use the C++11 ABI (as torch-sys assumes unless told otherwise).
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        // ProcessGroupGloo.hpp includes Gloo's headers, which the wheel does not ship.
        .include("src/shim/gloo_decl")
        .file("src/shim/uamt_torch.cpp")
        .file("src/shim/uamt_dist.cpp")
        .file("src/shim/uamt_kernels.cpp")
        // The kernels run in every build (tests included): always optimised.
        .opt_level(3)
        .compile("uamt_torch_shim");
}
