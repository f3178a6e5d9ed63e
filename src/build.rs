//! Build script of both packages (the core library's and, through `build = "../src/build.rs"`,
//! the actors crate's; kept under src/ so the top level stays as agreed).
//!
//! - Embeds libtorch's library directory as an rpath in every binary, test and bench, so nothing
//!   has to set LD_LIBRARY_PATH.
//! - Where that libtorch has a CUDA backend (`libtorch_cuda.so`, as the `torch` wheels have),
//!   links it with `--no-as-needed`: nothing in our code references its symbols, so the linker's
//!   default `--as-needed` would drop it, libtorch would never load it, and `device = "cuda"`
//!   would fail with "Could not run 'aten::empty_strided' ... from the 'CUDA' backend".
use std::path::Path;

fn main() {
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else { return };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    let cuda: Vec<&str> = ["torch_cuda", "c10_cuda"].into_iter().filter(|l| Path::new(&dir).join(format!("lib{l}.so")).exists()).collect();
    if !cuda.is_empty() {
        println!("cargo:rustc-link-search=native={dir}");
        let libs: Vec<String> = cuda.iter().map(|l| format!("-l{l}")).collect();
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        for l in libs {
            println!("cargo:rustc-link-arg={l}");
        }
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
        println!("cargo:rustc-cfg=libtorch_cuda");
    }
    println!("cargo::rustc-check-cfg=cfg(libtorch_cuda)");
}
