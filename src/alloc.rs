//! The C allocator's thresholds for a process whose big buffers (activations, gradients) are
//! freed and asked for again every iteration.
//!
//! With glibc's defaults a tensor over the (adaptive, at most 32 MiB) mmap threshold is mapped
//! fresh on every allocation and unmapped when freed, and free memory at the top of the heap is
//! trimmed back to the kernel: each iteration then pays page faults and page zeroing for memory
//! it had a moment ago (about 10 % of a CPU profile, mostly system time). Keeping those buffers in
//! the heap turns that into reuse. Measured on the 2-core development machine (AMD EPYC), UA-MT at
//! 48x48x32 with 8 filters: 4-6 % less wall time per iteration (`benches/RESULTS.md`).

/// Raises glibc's mmap and trim thresholds (no-op elsewhere). Call at the start of `main`,
/// before other threads allocate. The environment variables `MALLOC_MMAP_THRESHOLD_` and
/// `MALLOC_TRIM_THRESHOLD_`, where set, win: a user's tuning is kept.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |var: &str| std::env::var_os(var).is_some();
        // SAFETY: mallopt only changes the allocator's parameters; glibc serialises it against
        // allocation, and it is called before any other thread exists.
        unsafe {
            if !set("MALLOC_MMAP_THRESHOLD_") {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            }
            if !set("MALLOC_TRIM_THRESHOLD_") {
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        }
    }
}

/// For the inference commands (`predict`, `eval`): every allocation from the heap, none mapped
/// (glibc's `M_MMAP_MAX` = 0), on top of [`tune`]. A full-resolution activation of a sliding
/// window (64 MiB for a 112x112x80 window with 16 filters) is above the 32 MiB ceiling of the mmap
/// threshold, so [`tune`] cannot keep it: without this, every window maps and unmaps its largest
/// tensors anew. Not for training, whose allocator settings are measured separately. The
/// environment variable `MALLOC_MMAP_MAX_`, where set, wins. Call before other threads allocate.
pub fn tune_for_inference() {
    tune();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_MAX_").is_none() {
        // SAFETY: as in `tune`.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
        }
    }
    // One arena: the window workers (`eval::infer::WindowWorkers`) would otherwise each get a
    // heap of their own, which glibc grows and shrinks by mapping (so every window faults its
    // activations in again: 1.15 M minor faults instead of 0.42 M for two LA volumes, 1.5 s
    // more system time). The allocations are few and large, so one arena's lock costs nothing.
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: as in `tune`.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}
