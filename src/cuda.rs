//! libtorch's CUDA backend, loaded at run time. The binaries do not link `libtorch_cuda.so`
//! (see `src/build.rs`); the first question about CUDA goes through here, which loads it. Kept
//! apart (it imports nothing of this crate) so that `device.rs` and `gpu.rs` can both use it.

/// The file name of libtorch's CUDA backend, loaded by [`cuda_backend`].
const CUDA_BACKEND: &str = "libtorch_cuda.so";

/// Loads libtorch's CUDA backend (`libtorch_cuda.so`, found through the binary's rpath or
/// `LD_LIBRARY_PATH`) the first time it is called; whether it is loaded.
///
/// The binaries do not link the backend: loading it and the CUDA libraries it needs (cuDNN,
/// cuBLAS, NCCL, ...) took 0.4 s and 470 MB of every command, `uamt --version` included, on a
/// machine without a GPU. Only resolving a CUDA (or, where an NVIDIA driver is installed, an
/// `auto`) device loads it. It must be loaded before libtorch is first asked about CUDA: libtorch
/// settles on "no CUDA" for good the first time it looks for the backend, so every CUDA query in
/// this code base goes through [`cuda_device_count`] or `device::DeviceRequest::resolve`.
pub fn cuda_backend() -> bool {
    static LOADED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOADED.get_or_init(|| {
        let name = std::ffi::CString::new(CUDA_BACKEND).expect("no NUL in a constant");
        // SAFETY: dlopen with a valid C string; the handle is kept for the life of the process
        // (never closed), as a linked library would be. The backend's static initialisers
        // register its kernels and hooks with the libtorch already loaded.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            tracing::debug!(library = CUDA_BACKEND, why = %dl_error(), "libtorch's CUDA backend not loaded");
        }
        !handle.is_null()
    })
}

/// The last `dlerror` message.
fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string owned by libc, copied at once.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown".into()
    } else {
        // SAFETY: non-null, NUL-terminated (dlerror's contract).
        unsafe { std::ffi::CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

/// Whether an NVIDIA driver is installed (its user-space library `libcuda.so.1` can be loaded):
/// cheap, and without it there is no GPU to use, so `auto` does not load libtorch's backend.
pub fn driver_present() -> bool {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PRESENT.get_or_init(|| {
        let name = std::ffi::CString::new("libcuda.so.1").expect("no NUL in a constant");
        // SAFETY: as in `cuda_backend`; the driver library stays loaded (libtorch would load it).
        !unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_GLOBAL) }.is_null()
    })
}

/// The CUDA devices libtorch sees (0 without the backend, a driver or a GPU); loads the backend
/// first ([`cuda_backend`]).
pub fn cuda_device_count() -> usize {
    if !cuda_backend() {
        return 0;
    }
    tch::Cuda::device_count().max(0) as usize
}
