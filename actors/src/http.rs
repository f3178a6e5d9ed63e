//! The Prometheus endpoint: a small HTTP/1.1 server on the configured address answering
//! `GET /metrics` with the text exposition format (and `GET /healthz` with `ok`).

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};

/// Installs the global Prometheus recorder (once per process) and returns its handle.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])?
        .install_recorder()?;
    crate::emit::describe_all();
    Ok(handle)
}

/// Binds `addr` (port 0 picks a free port) and serves in a background thread; returns the
/// bound address.
pub fn serve(addr: &str, handle: PrometheusHandle) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).map_err(|e| anyhow::anyhow!("telemetry.listen: cannot bind {addr}: {e}"))?;
    let local = listener.local_addr()?;
    std::thread::Builder::new().name("metrics-http".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            if let Err(e) = answer(stream, &handle) {
                tracing::debug!(error = %e, "metrics request failed");
            }
        }
    })?;
    Ok(local)
}

fn answer(mut stream: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Skip the headers.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = match (request_line.split_whitespace().next(), path) {
        (Some("GET"), "/metrics") => ("200 OK", render(handle)),
        (Some("GET"), "/healthz") => ("200 OK", "ok\n".to_string()),
        _ => ("404 Not Found", "not found: try /metrics\n".to_string()),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

/// Everything the recorder holds plus the fractional-seconds counters.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut s = handle.render();
    s.push_str(&crate::emit::render_seconds_totals());
    s
}
