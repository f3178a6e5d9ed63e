//! A SIGBUS handler for the memory-mapped dataset files: a file truncated in place while it is
//! mapped makes the next read of the lost pages raise SIGBUS, which would otherwise kill the
//! process without a word. The handler writes one line saying what happened and ends the
//! process with exit code 135 (128 + SIGBUS). Checkpoints are written atomically (a new file
//! renamed over the old), so the last one stays intact and `--resume` continues from it.
//!
//! Readers also compare each mapped file's length before reading a case
//! ([`crate::data::NiftiVolume::check_unchanged`]) and skip the case when it changed; the handler
//! is for the truncation that races a read.

/// What the handler writes on standard error before exiting.
pub const MESSAGE: &str = "uamt: fatal: SIGBUS while reading a memory-mapped dataset volume (.nii or its .nii.gz \
cache copy): a dataset file was truncated or rewritten in place while training or evaluation read it. Replace \
dataset files by rename, never edit them in place. The last checkpoint is intact (checkpoints are written \
atomically); restart with --resume.\n";

/// The exit code the handler ends the process with (128 + SIGBUS).
pub const EXIT_CODE: i32 = 135;

#[cfg(target_os = "linux")]
mod imp {
    use std::sync::Once;

    /// SIGBUS on Linux (x86-64 and aarch64).
    const SIGBUS: i32 = 7;

    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
        fn write(fd: i32, buf: *const u8, count: usize) -> isize;
        fn _exit(status: i32) -> !;
    }

    extern "C" fn on_sigbus(_sig: i32) {
        let m = super::MESSAGE.as_bytes();
        // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is a static string.
        unsafe {
            write(2, m.as_ptr(), m.len());
            _exit(super::EXIT_CODE);
        }
    }

    pub fn install() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            // SAFETY: installs a handler that only calls async-signal-safe functions.
            unsafe {
                signal(SIGBUS, on_sigbus as extern "C" fn(i32) as usize);
            }
        });
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    pub fn install() {}
}

/// Installs the handler (once per process; later calls do nothing). Done by the binary before it
/// maps a dataset; a library user may call it too.
pub fn install_handler() {
    imp::install();
}
