//! Build script of the core library (kept under src/ so the top level stays as agreed):
//! embeds libtorch's library directory as an rpath in every binary, test and bench of this
//! package, so nothing has to set LD_LIBRARY_PATH.
fn main() {
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
