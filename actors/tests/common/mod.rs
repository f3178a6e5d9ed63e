//! Helpers of the tests that drive the daemon's endpoint through the binary (`access.rs`,
//! `systemd.rs`, `prometheus.rs`): a tiny config, token files, a CA and a server certificate made
//! with openssl, this machine's non-loopback address, requests from a chosen peer, and waits.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uamt_actors::client::{Answer, ClientError, Endpoint};

/// A control token and a read token, as the tests write them.
pub const CONTROL_TOKEN: &str = "ctl-5f0c2a9e7d3b41c8a6e2f9d0b7c4a1e3";
pub const READ_TOKEN: &str = "read-8b1d6e3f0a2c4e5b9d7f1a3c5e7b9d0f";

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_uamt")
}

/// A tiny UA-MT config under `dir` (6 synthetic cases, 4 filters, one libtorch thread) with the
/// `[telemetry]` lines `telemetry` (the listen address among them).
pub fn write_config(dir: &Path, iterations: i64, every: i64, telemetry: &str) -> PathBuf {
    let text = format!(
        "[data]\nsynth_dir = \"{synth}\"\npatch = [32, 32, 16]\n[data.synth]\ncases = 6\nlabelled = 2\ntest = 1\n\
         size = [40, 40, 24]\n[model]\nn_filters = 4\n[method]\nconsistency_interval = 1\n[optim]\n\
         iterations = {iterations}\n[device]\ndevice = \"cpu\"\nthreads = 1\n[checkpoint]\ndir = \"{ckpt}\"\n\
         every = {every}\nkeep = 10\n[telemetry]\nlog_every = 1\n{telemetry}\n",
        synth = dir.join("synth").display(),
        ckpt = dir.join("ckpt").display(),
    );
    let p = dir.join("run.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// Writes `text` to `dir/name` with `mode`; returns the path.
pub fn write_mode(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

/// The two token files (mode 600) in `dir`: (control, read).
pub fn token_files(dir: &Path) -> (PathBuf, PathBuf) {
    (
        write_mode(dir, "control.token", &format!("{CONTROL_TOKEN}\n"), 0o600),
        write_mode(dir, "read.token", READ_TOKEN, 0o600),
    )
}

/// Runs openssl with `args` in `dir`, failing the test with its output if it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl (is it installed?)");
    assert!(out.status.success(), "openssl {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// A certificate authority `<name>-ca.pem` (key `<name>-ca.key`) and a server certificate it
/// signed, `<name>-cert.pem` with key `<name>-key.pem` (mode 600), for 127.0.0.1 and localhost.
pub struct Pki {
    /// The CA's certificate (what `--cacert` and Prometheus's `ca_file` take).
    pub ca: PathBuf,
    /// The server's certificate.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
}

/// Makes a [`Pki`] called `name` in `dir` with openssl (EC P-256 keys, valid for two days).
pub fn make_pki(dir: &Path, name: &str) -> Pki {
    let f = |s: &str| format!("{name}-{s}");
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    let (ca_key, ca_pem, key, csr, cert) = (f("ca.key"), f("ca.pem"), f("key.pem"), f("cert.csr"), f("cert.pem"));
    let ca_subject = format!("/CN={name} test CA");
    ca.extend(["-keyout", &ca_key, "-out", &ca_pem, "-days", "2", "-subj", &ca_subject]);
    ca.extend(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    openssl(dir, &ca);
    let mut req = vec!["req"];
    req.extend(ec);
    req.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=localhost"]);
    openssl(dir, &req);
    std::fs::write(
        dir.join(f("ext.cnf")),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n\
         subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    let ext = f("ext.cnf");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
    );
    let key = dir.join(key);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    Pki { ca: dir.join(ca_pem), cert: dir.join(cert), key }
}

/// A self-signed server certificate `<name>-cert.pem` (not a CA: `CA:FALSE`, as rustls wants of
/// an end entity) with key `<name>-key.pem` (mode 600), for 127.0.0.1 and localhost. The
/// certificate is its own CA: `ca` and `cert` are the same file.
pub fn make_self_signed(dir: &Path, name: &str) -> Pki {
    let (key, cert) = (format!("{name}-key.pem"), format!("{name}-cert.pem"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &cert,
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
    );
    let key = dir.join(key);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    Pki { ca: dir.join(&cert), cert: dir.join(cert), key }
}

/// The `[telemetry]` lines for TLS with `pki`.
pub fn tls_lines(pki: &Pki) -> String {
    format!("tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n", pki.cert.display(), pki.key.display())
}

/// An IPv4 address of this machine that is not loopback (the test fails, saying so, when there
/// is none: the rule it serves must be tested against a real non-loopback peer).
pub fn non_loopback_ip() -> IpAddr {
    let mut found = None;
    // SAFETY: getifaddrs fills a list this function walks and frees; nothing outlives it.
    unsafe {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        assert_eq!(libc::getifaddrs(&mut list), 0, "getifaddrs failed");
        let mut p = list;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() && (*a).sa_family as i32 == libc::AF_INET {
                let sin = &*(a as *const libc::sockaddr_in);
                let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() && !ip.is_unspecified() && found.is_none() {
                    found = Some(IpAddr::V4(ip));
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    found.expect(
        "this machine has no non-loopback IPv4 address: the loopback-only control rule needs a peer that is not \
         loopback (give the machine an interface address, or run the test in a network namespace with one)",
    )
}

/// Reads the address `uamt train --addr-file F` wrote, waiting for the file (at most `secs`).
pub fn wait_addr(file: &Path, d: &mut support_daemon::Guard, secs: u64) -> SocketAddr {
    let t0 = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(file) {
            if let Ok(a) = text.trim().parse() {
                return a;
            }
        }
        if let Some(s) = d.0.try_wait().unwrap() {
            panic!("the daemon exited ({s}) before it listened:\n{}", log(&d.1));
        }
        assert!(t0.elapsed() < Duration::from_secs(secs), "no address in {} after {secs} s", file.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon guard of these tests.
pub mod support_daemon {
    use std::path::PathBuf;
    use std::process::Child;

    /// A spawned daemon (killed and reaped on drop) and the folder holding its `log`.
    pub struct Guard(pub Child, pub PathBuf);

    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
pub use support_daemon::Guard;

/// Starts `uamt train --config <config> --addr-file <dir>/addr` in `dir` with `env`, stderr to
/// `dir/log`.
pub fn start(config: &Path, dir: &Path, env: &[(&str, &str)]) -> Guard {
    let mut cmd = Command::new(bin());
    cmd.args(["train", "--config"]).arg(config).arg("--addr-file").arg(dir.join("addr"));
    start_cmd(cmd, dir, env)
}

/// Spawns `cmd` in `dir` with `env`, stderr to `dir/log`, guarded.
pub fn start_cmd(mut cmd: Command, dir: &Path, env: &[(&str, &str)]) -> Guard {
    cmd.current_dir(dir).stdout(Stdio::null()).stderr(std::fs::File::create(dir.join("log")).unwrap());
    cmd.env_remove("RUST_LOG").env_remove("NOTIFY_SOCKET").env_remove("WATCHDOG_USEC").env_remove("WATCHDOG_PID");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Guard(cmd.spawn().expect("spawn uamt"), dir.to_path_buf())
}

/// The daemon's log so far.
pub fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("log")).unwrap_or_default()
}

/// Waits for the daemon to exit, at most `secs`.
pub fn wait_exit(d: &mut Guard, secs: u64) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = d.0.try_wait().unwrap() {
            return s;
        }
        assert!(t0.elapsed() < Duration::from_secs(secs), "the daemon did not exit within {secs} s:\n{}", log(&d.1));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `f()` holds, at most `secs`, naming `what` on failure.
pub fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(secs), "timed out after {secs} s waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An endpoint at `addr`, with `token` as bearer and TLS trusting `ca` when given.
pub fn endpoint(addr: SocketAddr, token: Option<&str>, ca: Option<&Path>) -> Endpoint {
    Endpoint {
        addr: addr.to_string(),
        tls: ca.map(|c| Arc::new(uamt_actors::tls::client_config("ca", c).expect("CA config"))),
        authorization: token.map(|t| format!("Bearer {t}")),
    }
}

/// `method path` at `addr` with `token`, over TLS trusting `ca` when given.
pub fn call(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, ca: Option<&Path>) -> Answer {
    endpoint(addr, token, ca).request(method, path).unwrap_or_else(|e| panic!("{method} {path} at {addr}: {e}"))
}

/// Like [`call`], keeping the error.
pub fn try_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    ca: Option<&Path>,
) -> Result<Answer, ClientError> {
    endpoint(addr, token, ca).request(method, path)
}

/// `/status` as JSON.
pub fn status(addr: SocketAddr, token: Option<&str>, ca: Option<&Path>) -> serde_json::Value {
    let a = call(addr, "GET", "/status", token, ca);
    assert_eq!(a.status, 200, "{}", a.body);
    serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {}", a.body))
}

/// Waits until `/status` reports `iteration` steps done.
pub fn wait_iteration(addr: SocketAddr, token: Option<&str>, ca: Option<&Path>, iteration: i64, secs: u64) {
    wait_for(&format!("iteration {iteration}"), secs, || {
        status(addr, token, ca)["iteration"].as_i64() == Some(iteration)
    });
}

/// `uamt ctl <args>`.
pub fn ctl(args: &[&str]) -> Output {
    Command::new(bin()).arg("ctl").args(args).env_remove("RUST_LOG").output().expect("run uamt ctl")
}

/// stdout and stderr of `out`, for messages.
pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}
