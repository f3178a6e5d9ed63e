//! The HTTP control plane against real sockets: the server runs on 127.0.0.1 port 0 and the tests
//! speak HTTP/1.1 over `std::net::TcpStream`. Idle and slow clients do not hold up a scrape, large
//! bodies are refused, `/status` and `/healthz` follow the board, `POST /stop` and
//! `POST /checkpoint` reach the controls, wrong methods get 405 and unknown paths 404.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use uamt::train::StepReport;
use uamt_actors::access::Access;
use uamt_actors::control::Controls;
use uamt_actors::http::{spawn_server, HttpServerHandle, HttpState, MAX_BODY};
use uamt_actors::status::{EvalStatus, Phase, StatusBoard};

/// How long a test waits on a socket read before it counts as a failure.
const READ_WAIT: Duration = Duration::from_secs(10);

/// The process-wide Prometheus recorder (it can be installed once per process).
fn recorder() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| uamt_actors::http::install_recorder().expect("install the recorder")).clone()
}

/// A server on a free loopback port, with the board and controls it serves.
struct Served {
    /// The server (stopped when dropped).
    server: HttpServerHandle,
    /// Its board.
    board: StatusBoard,
    /// Its controls.
    controls: Controls,
}

fn serve(stall_after: Duration) -> Served {
    let board = StatusBoard::new(100, stall_after);
    let controls = Controls::new();
    let state = HttpState {
        prometheus: Some(recorder()),
        board: board.clone(),
        controls: controls.clone(),
        access: Access::default(),
    };
    let server = spawn_server("127.0.0.1:0", state, None).expect("start the server");
    assert_ne!(server.addr().port(), 0, "port 0 must be replaced by the bound port");
    Served { server, board, controls }
}

/// An answer: status code, header block, body.
struct Answer {
    /// Status code.
    status: u16,
    /// Header lines, lowercased.
    headers: String,
    /// Body text.
    body: String,
}

/// Parses a whole HTTP/1.1 response.
fn parse(raw: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end in {text:?}"));
    let status =
        head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad head {head:?}"));
    Answer { status, headers: head.to_lowercase(), body: body.to_string() }
}

/// Sends `head` (request line and headers, without the blank line) and `body` on a fresh
/// connection asking the server to close it, and reads the whole answer.
fn exchange(addr: SocketAddr, head: &str, body: &[u8]) -> Answer {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(READ_WAIT)).unwrap();
    s.write_all(format!("{head}\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the answer");
    parse(&raw)
}

fn get(addr: SocketAddr, path: &str) -> Answer {
    exchange(addr, &format!("GET {path} HTTP/1.1"), b"")
}

fn post(addr: SocketAddr, path: &str) -> Answer {
    exchange(addr, &format!("POST {path} HTTP/1.1\r\nContent-Length: 0"), b"")
}

fn json(a: &Answer) -> serde_json::Value {
    serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", a.body))
}

fn report(iter: i64) -> StepReport {
    StepReport {
        iter,
        loss: 0.75,
        supervised: 0.5,
        ce: 0.4,
        dice: 0.6,
        consistency: 0.02,
        mask_fraction: 0.8,
        weight: 0.1,
        threshold: 0.3,
        lr: 0.01,
    }
}

/// A scrape of /metrics, asserting it answers 200 within a second.
fn quick_scrape(addr: SocketAddr) -> Answer {
    let t0 = Instant::now();
    let a = get(addr, "/metrics");
    let took = t0.elapsed();
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(took < Duration::from_secs(1), "the scrape took {took:?}");
    a
}

#[test]
fn idle_connections_do_not_block_a_scrape() {
    let s = serve(Duration::from_secs(3600));
    let idle: Vec<TcpStream> = (0..50).map(|_| TcpStream::connect(s.server.addr()).expect("connect")).collect();
    uamt_actors::emit::iteration(&report(0), 0.1);
    let a = quick_scrape(s.server.addr());
    assert!(a.headers.contains("content-type: text/plain; version=0.0.4"), "{}", a.headers);
    assert!(a.body.contains("uamt_iterations_total"), "the recorder's metrics are served:\n{}", a.body);
    assert!(a.body.contains("# TYPE uamt_stage_busy_seconds_total counter"), "so are the seconds counters");
    drop(idle);
}

/// Sends one byte of an endless request head per 100 ms, at most `bytes` of them; returns whether
/// the server cut the client off first, and what it answered.
fn slowloris(addr: SocketAddr, bytes: usize) -> (bool, Vec<u8>) {
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let head = format!("GET /metrics HTTP/1.1\r\nX-Slow: {}", "a".repeat(bytes));
    let mut answer = Vec::new();
    for &byte in head.as_bytes().iter().take(bytes) {
        if c.write_all(&[byte]).is_err() {
            return (true, answer);
        }
        let mut buf = [0u8; 512];
        match c.read(&mut buf) {
            Ok(0) => return (true, answer),
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return (true, answer),
        }
    }
    (false, answer)
}

#[test]
fn slowloris_does_not_block_a_scrape_and_is_cut_off() {
    let s = serve(Duration::from_secs(3600));
    let addr = s.server.addr();
    // 150 bytes take 15 s or more; the server's request timeout is 3 s.
    let slow = std::thread::spawn(move || slowloris(addr, 150));
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        quick_scrape(addr);
    }
    let (cut, answer) = slow.join().unwrap();
    assert!(cut, "a client sending one header byte per 100 ms was still connected after 15 s");
    if !answer.is_empty() {
        assert_eq!(parse(&answer).status, 408, "{}", String::from_utf8_lossy(&answer));
    }
}

#[test]
fn oversized_bodies_are_refused() {
    let s = serve(Duration::from_secs(3600));
    let addr = s.server.addr();
    // Announced too large: refused from the header alone.
    let a = exchange(addr, "POST /stop HTTP/1.1\r\nContent-Length: 1000000", b"");
    assert_eq!(a.status, 413, "{}", a.body);
    // Chunked, larger than the limit once read.
    let big = vec![b'x'; MAX_BODY + 100];
    let mut chunked = format!("{:x}\r\n", big.len()).into_bytes();
    chunked.extend_from_slice(&big);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let a = exchange(addr, "POST /checkpoint HTTP/1.1\r\nTransfer-Encoding: chunked", &chunked);
    assert_eq!(a.status, 413, "{}", a.body);
    assert!(!s.controls.stop_requested(), "a refused request must not stop the run");
    assert!(!s.controls.checkpoint_requested(), "a refused request must not ask for a checkpoint");
    // A small body is fine.
    let a = exchange(addr, "POST /checkpoint HTTP/1.1\r\nContent-Length: 2", b"{}");
    assert_eq!(a.status, 202, "{}", a.body);
}

#[test]
fn status_is_json_and_follows_the_board() {
    let s = serve(Duration::from_secs(3600));
    let addr = s.server.addr();
    let v = json(&get(addr, "/status"));
    for key in [
        "phase",
        "iteration",
        "end",
        "step",
        "it_per_s",
        "eta_s",
        "queues",
        "last_eval",
        "evals_done",
        "evals_failed",
        "failed_stage",
        "healthy",
    ] {
        assert!(v.get(key).is_some(), "/status lacks {key}: {v}");
    }
    assert_eq!(v["phase"], "starting");
    assert!(v["step"].is_null());

    let (tx, _rx) = uamt_actors::queue::bounded::<u8>("http-test-queue", 3);
    tx.send(1).unwrap();
    tx.send(2).unwrap();
    s.board.set_phase(Phase::Training);
    s.board.on_step(&report(41), 3.5, 17.0);
    s.board.on_queue("by-hand", 1, 8);
    s.board.on_eval(EvalStatus {
        name: "iter_150".into(),
        source: "periodic".into(),
        dice: Some(0.8),
        jaccard: Some(0.7),
        hd95: Some(5.0),
        asd: None,
        cases: 2,
    });
    s.board.on_eval_failure();
    let a = get(addr, "/status");
    assert!(a.headers.contains("content-type: application/json"), "{}", a.headers);
    let v = json(&a);
    assert_eq!(v["phase"], "training");
    assert_eq!((v["iteration"].as_i64(), v["end"].as_i64()), (Some(42), Some(100)));
    assert_eq!(v["step"]["loss"], 0.75);
    assert_eq!(v["step"]["mask_fraction"], 0.8);
    assert_eq!(v["step"]["threshold"], 0.3);
    assert_eq!((v["it_per_s"].as_f64(), v["eta_s"].as_f64()), (Some(3.5), Some(17.0)));
    assert_eq!(v["queues"]["http-test-queue"], serde_json::json!({"depth": 2, "capacity": 3}));
    assert_eq!(v["queues"]["by-hand"], serde_json::json!({"depth": 1, "capacity": 8}));
    assert_eq!(v["last_eval"]["dice"], 0.8);
    assert!(v["last_eval"]["asd"].is_null());
    assert_eq!((v["evals_done"].as_u64(), v["evals_failed"].as_u64()), (Some(1), Some(1)));
    assert_eq!(v["healthy"], true);
}

#[test]
fn healthz_turns_503_when_a_stage_fails() {
    let s = serve(Duration::from_secs(3600));
    let a = get(s.server.addr(), "/healthz");
    assert_eq!((a.status, a.body.as_str()), (200, "ok\n"));
    s.board.stage_failed("teacher", "CUDA out of memory");
    let a = get(s.server.addr(), "/healthz");
    assert_eq!(a.status, 503);
    assert!(a.body.contains("teacher") && a.body.contains("CUDA out of memory"), "{}", a.body);
    let v = json(&get(s.server.addr(), "/status"));
    assert_eq!(v["phase"], "failed");
    assert_eq!(v["failed_stage"]["stage"], "teacher");
}

#[test]
fn healthz_turns_503_when_training_stalls() {
    let s = serve(Duration::from_millis(200));
    assert_eq!(get(s.server.addr(), "/healthz").status, 200, "starting is not stalling");
    s.board.set_phase(Phase::Training);
    let t0 = Instant::now();
    let a = loop {
        let a = get(s.server.addr(), "/healthz");
        if a.status != 200 || t0.elapsed() > Duration::from_secs(20) {
            break a;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(a.status, 503, "no step for 200 ms while training must be unhealthy");
    assert!(a.body.contains("stalled"), "{}", a.body);
    s.board.set_phase(Phase::Finished);
    assert_eq!(get(s.server.addr(), "/healthz").status, 200, "a finished run is healthy");
}

#[test]
fn stop_and_checkpoint_reach_the_controls() {
    let s = serve(Duration::from_secs(3600));
    let addr = s.server.addr();
    s.board.set_phase(Phase::Training);

    let a = post(addr, "/checkpoint");
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(json(&a)["accepted"], "checkpoint");
    assert!(s.controls.take_checkpoint_request());
    assert!(!s.controls.stop_requested(), "a checkpoint request is not a stop");

    let a = post(addr, "/stop");
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(json(&a)["accepted"], "stop");
    assert!(s.controls.stop_requested());
    assert_eq!(s.controls.stop_reason(), Some("http"));
    assert!(s.controls.wait_for_stop(Duration::ZERO));
    assert_eq!(json(&get(addr, "/status"))["phase"], "stopping");
    assert_eq!(json(&post(addr, "/stop"))["already_requested"], true);
}

#[test]
fn wrong_methods_get_405_and_unknown_paths_404() {
    let s = serve(Duration::from_secs(3600));
    let addr = s.server.addr();
    let a = get(addr, "/stop");
    assert_eq!(a.status, 405);
    assert!(a.headers.contains("allow: post"), "{}", a.headers);
    assert_eq!(get(addr, "/checkpoint").status, 405);
    assert_eq!(post(addr, "/metrics").status, 405);
    assert_eq!(exchange(addr, "DELETE /status HTTP/1.1", b"").status, 405);
    assert_eq!(get(addr, "/nope").status, 404);
    assert_eq!(get(addr, "/").status, 404);
    assert!(!s.controls.stop_requested(), "GET /stop must not stop the run");
}

#[test]
fn stop_closes_the_port() {
    let s = serve(Duration::from_secs(3600));
    let addr = s.server.addr();
    assert_eq!(get(addr, "/healthz").status, 200);
    assert!(s.server.stop(), "the server thread should end within its bound");
    let t0 = Instant::now();
    while TcpStream::connect(addr).is_ok() {
        assert!(t0.elapsed() < Duration::from_secs(10), "{addr} still accepts connections after stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_taken_port_is_an_error_naming_the_address() {
    let s = serve(Duration::from_secs(3600));
    let state = HttpState {
        prometheus: None,
        board: StatusBoard::new(1, Duration::from_secs(1)),
        controls: Controls::new(),
        access: Access::default(),
    };
    let addr = s.server.addr().to_string();
    let e = spawn_server(&addr, state, None).err().expect("binding a taken port must fail");
    assert!(e.to_string().contains(&addr), "{e}");
}
