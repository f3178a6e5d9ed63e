//! How much memory this process may plan with, and the check every command makes before a big
//! allocation: `MemAvailable`, the cgroup's limit and `UAMT_MAX_MEMORY`, whichever is smallest;
//! and how busy the machine is (the load average), for commands that time work on it.

/// libtorch, its kernels' scratch, our threads, the mapped dataset's working set: a fixed allowance.
/// The mapped library code alone counts 0.3-0.4 GiB of resident memory on a CPU run, more when
/// the libraries were just installed and sit whole in the page cache (the kernel then maps more of
/// them per fault); 0.75 GiB fell 0.04 GiB short of a fresh clone's peak in CI.
pub const RUNTIME_BYTES: u64 = 1 << 30;

/// The environment variable that caps the memory uamt plans with (bytes, or with a `K`, `M`, `G`
/// or `T` suffix, powers of 1024): for sharing a machine with other jobs.
pub const MAX_MEMORY_ENV: &str = "UAMT_MAX_MEMORY";

/// `2G`, `512M`, `1048576` as bytes.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return None,
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let v: f64 = num.trim().parse().ok()?;
    (v.is_finite() && v >= 0.0).then(|| (v * (1u64 << shift) as f64).min(u64::MAX as f64) as u64)
}

/// `Err` (what needs how much, what is available, and the flags that change it) when `bytes`
/// exceed the memory this process can use ([`available_memory`]); `Ok` where that is unknown.
pub fn check_fits(bytes: u64, what: &str, change: &str) -> std::result::Result<(), String> {
    match available_memory() {
        Some(available) if bytes > available => Err(format!(
            "{what} needs about {} but this machine has {} available ({MAX_MEMORY_ENV} and the cgroup's limit \
             included); {change}",
            gib(bytes),
            gib(available)
        )),
        _ => Ok(()),
    }
}

/// The memory this process can still use, in bytes: `MemAvailable` from `/proc/meminfo`, the
/// cgroup's limit minus its usage, and [`MAX_MEMORY_ENV`], whichever is smallest. `None` where
/// none can be read.
pub fn available_memory() -> Option<u64> {
    let cap = std::env::var(MAX_MEMORY_ENV).ok().and_then(|v| parse_bytes(&v));
    let found = system_memory();
    match (found, cap) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `MemAvailable`, or the cgroup's limit minus its usage when that is smaller.
fn system_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        t.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb.saturating_mul(1024))
    });
    let read = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let cgroup = match (read("/sys/fs/cgroup/memory.max"), read("/sys/fs/cgroup/memory.current")) {
        (Some(max), Some(cur)) => Some(max.saturating_sub(cur)),
        _ => None,
    };
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The 1-minute load average (`/proc/loadavg`): how busy the machine is, for a command that
/// times work on it (`uamt plan`). `None` where it cannot be read.
pub fn load_average() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_bytes("2G"), Some(2 << 30));
        assert_eq!(parse_bytes("512m"), Some(512 << 20));
        assert_eq!(parse_bytes("1.5K"), Some(1536));
        assert_eq!(parse_bytes("100"), Some(100));
        assert_eq!(parse_bytes("-1G"), None);
        assert_eq!(parse_bytes("lots"), None);
    }

    #[test]
    fn the_load_average_is_read_here() {
        let l = load_average().expect("/proc/loadavg on Linux");
        assert!(l.is_finite() && l >= 0.0, "{l}");
    }

    #[test]
    fn available_memory_is_read_here() {
        let a = available_memory().expect("/proc/meminfo on Linux");
        assert!(a > 1 << 20);
    }
}
