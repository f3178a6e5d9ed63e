//! The daemon's HTTP control plane on `telemetry.listen`: an actix-web server on a thread of its
//! own (its own actix `System`, two workers), independent of the caller's runtime.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /metrics` | Prometheus text exposition: the recorder's metrics and the seconds counters |
//! | `GET /healthz` | 200 `ok`, or 503 and the reason (a stage failed; no step for a while in training) |
//! | `GET /status` | JSON: phase, iteration, last step, rate and ETA, queues, last evaluation, failure |
//! | `POST /checkpoint` | 202: a checkpoint is written after the current step |
//! | `POST /stop` | 202: the run finishes its step, writes a checkpoint and exits 0 (as SIGTERM) |
//!
//! Other methods on these paths get 405, other paths 404.
//!
//! # Who may call what
//! [`crate::access`] decides, per request, from the peer address and the `Authorization` header:
//! control requests (`/stop`, `/checkpoint`) need the control token when
//! `telemetry.control_token_file` is set (401 without it) and come from loopback peers only when
//! it is not (403 from anywhere else, with a message saying how to enable them); the read-only
//! endpoints need the read (or the control) token when `telemetry.read_token_file` is set. Every
//! refused request is logged with the peer address and changes nothing; every accepted control
//! request is logged with the peer address. With `telemetry.tls_cert_file` and
//! `telemetry.tls_key_file` the endpoint speaks HTTPS only (rustls): a plain HTTP request on that
//! port gets no answer.
//!
//! # Limits
//! A slow or idle client must not block a scrape: requests are served asynchronously, a request
//! head must arrive within [`REQUEST_TIMEOUT`], idle keep-alive connections close after
//! [`KEEP_ALIVE`], each worker holds at most [`MAX_CONNECTIONS`], and a request body may be at most
//! [`MAX_BODY`] bytes (the control requests take none).

use crate::access::{Access, Kind};
use crate::control::Controls;
use crate::status::StatusBoard;
use actix_web::http::header::ContentType;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;
use std::time::Duration;

/// Time a client has to send a whole request head (then 408 and the connection is closed).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Time a connection may sit idle between requests.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Time a closing connection gets to shut down.
pub const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Concurrent connections per worker.
pub const MAX_CONNECTIONS: usize = 256;
/// Worker threads.
pub const WORKERS: usize = 2;
/// Largest request body accepted, in bytes (larger ones get 413).
pub const MAX_BODY: usize = 1024;
/// Seconds a graceful stop waits for requests in flight.
const SHUTDOWN_SECS: u64 = 2;
/// How long [`HttpServerHandle::stop`] waits for the server thread.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address could not be bound (in use, not local, not an address).
    #[error("telemetry.listen: cannot bind {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// The server or its thread could not be started.
    #[error("telemetry.listen: cannot start the HTTP server on {addr}: {source}")]
    Start {
        /// The bound address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// Installs the global Prometheus recorder (once per process) and returns its handle.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    install_recorder_labelled(&[])
}

/// [`install_recorder`] with `labels` on every series (a data-parallel rank's `rank`).
pub fn install_recorder_labelled(labels: &[(&str, String)]) -> anyhow::Result<PrometheusHandle> {
    let mut builder =
        PrometheusBuilder::new().set_buckets(&[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])?;
    // A ranking takes seconds to an hour (every unlabelled case, Monte-Carlo passes and all).
    builder = builder.set_buckets_for_metric(
        metrics_exporter_prometheus::Matcher::Full(uamt::telemetry::Metric::RankSeconds.as_str().to_string()),
        &[1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0],
    )?;
    for (k, v) in labels {
        builder = builder.add_global_label(*k, v.clone());
    }
    crate::emit::set_global_labels(labels);
    let handle = builder.install_recorder()?;
    crate::emit::describe_all();
    Ok(handle)
}

/// Everything the recorder holds plus the fractional-seconds counters.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut s = handle.render();
    s.push_str(&crate::emit::render_seconds_totals());
    s
}

/// What the handlers read and write.
#[derive(Clone)]
pub struct HttpState {
    /// The Prometheus recorder's handle; without one `/metrics` serves only the seconds counters.
    pub prometheus: Option<PrometheusHandle>,
    /// What `/status` and `/healthz` report.
    pub board: StatusBoard,
    /// Where `/stop` and `/checkpoint` put their requests.
    pub controls: Controls,
    /// Who may read and who may control.
    pub access: Access,
}

/// The running server: its address and a way to stop it.
pub struct HttpServerHandle {
    /// The bound address (with the real port when 0 was asked).
    addr: SocketAddr,
    /// Whether it speaks HTTPS.
    tls: bool,
    /// actix's handle, to stop the server from outside its thread.
    server: actix_web::dev::ServerHandle,
    /// Told when the server thread ends.
    done: mpsc::Receiver<()>,
    /// The server thread; `None` once joined or given up on.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpServerHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https` or `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// Stops accepting, lets requests in flight finish (up to two seconds) and waits (up to five
    /// seconds) for the server thread; returns whether it ended in time. A thread that did not is
    /// left to end on its own.
    pub fn stop(mut self) -> bool {
        self.shutdown()
    }

    fn shutdown(&mut self) -> bool {
        let Some(thread) = self.thread.take() else { return true };
        // The command is sent when `stop` is called; the returned future only awaits completion.
        drop(self.server.stop(true));
        match self.done.recv_timeout(STOP_WAIT) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = thread.join();
                true
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(addr = %self.addr, "the HTTP server did not stop in time; leaving it");
                false
            }
        }
    }
}

impl Drop for HttpServerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Binds `addr` (port 0 picks a free port) and serves the control plane on a new thread with its
/// own actix system, over TLS when `tls` is given; returns once the socket is bound (connections
/// made from then on are served).
pub fn spawn_server(
    addr: &str,
    state: HttpState,
    tls: Option<rustls::ServerConfig>,
) -> Result<HttpServerHandle, HttpError> {
    let is_tls = tls.is_some();
    let listener = TcpListener::bind(addr).map_err(|source| HttpError::Bind { addr: addr.to_string(), source })?;
    let local = listener.local_addr().map_err(|source| HttpError::Bind { addr: addr.to_string(), source })?;
    let start = |source| HttpError::Start { addr: local, source };
    let (handle_tx, handle_rx) = mpsc::sync_channel(1);
    let (done_tx, done_rx) = mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            let system = actix_rt::System::new();
            let served = system.block_on(async move {
                let server = match build(listener, state, tls) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return Ok(());
                    }
                };
                let _ = handle_tx.send(Ok(server.handle()));
                server.await
            });
            if let Err(e) = served {
                tracing::warn!(error = %e, "the HTTP server ended with an error");
            }
            let _ = done_tx.send(());
        })
        .map_err(start)?;
    match handle_rx.recv() {
        Ok(Ok(server)) => {
            Ok(HttpServerHandle { addr: local, tls: is_tls, server, done: done_rx, thread: Some(thread) })
        }
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(start(e))
        }
        Err(_) => {
            let _ = thread.join();
            Err(start(std::io::Error::other("the server thread ended before starting")))
        }
    }
}

/// The configured server on `listener`, running once awaited.
fn build(
    listener: TcpListener,
    state: HttpState,
    tls: Option<rustls::ServerConfig>,
) -> std::io::Result<actix_web::dev::Server> {
    let state = web::Data::new(state);
    let server = HttpServer::new(move || {
        App::new().app_data(state.clone()).app_data(web::PayloadConfig::new(MAX_BODY)).configure(routes)
    })
    .workers(WORKERS)
    .max_connections(MAX_CONNECTIONS)
    .keep_alive(KEEP_ALIVE)
    .client_request_timeout(REQUEST_TIMEOUT)
    .client_disconnect_timeout(DISCONNECT_TIMEOUT)
    .shutdown_timeout(SHUTDOWN_SECS)
    // SIGTERM and SIGINT belong to the supervisor: they stop the run, not just this server.
    .disable_signals();
    let server = match tls {
        Some(config) => server.listen_rustls_0_23(listener, config)?,
        None => server.listen(listener)?,
    };
    Ok(server.run())
}

/// The routes. A resource answers 405 (with `Allow`) to a method it has no route for.
fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/metrics").route(web::get().to(metrics)))
        .service(web::resource("/healthz").route(web::get().to(healthz)))
        .service(web::resource("/status").route(web::get().to(status)))
        .service(web::resource("/checkpoint").route(web::post().to(checkpoint)))
        .service(web::resource("/stop").route(web::post().to(stop)))
        .default_service(web::to(not_found));
}

/// Whether a request of `kind` may proceed: `None`, or the refusal to answer (401 with
/// `WWW-Authenticate`, or 403), logged with the peer address. What was sent is never logged.
fn refused(req: &HttpRequest, state: &HttpState, kind: Kind) -> Option<HttpResponse> {
    let auth = req.headers().get(actix_web::http::header::AUTHORIZATION).map(|v| v.as_bytes());
    let peer = req.peer_addr();
    let refusal = state.access.check(kind, peer, auth).err()?;
    tracing::warn!(
        peer = %peer.map_or("unknown".to_string(), |p| p.to_string()),
        method = %req.method(),
        path = req.path(),
        status = refusal.status,
        "HTTP request refused: {}",
        refusal.message
    );
    let mut answer = match refusal.status {
        401 => {
            let mut a = HttpResponse::Unauthorized();
            a.insert_header((actix_web::http::header::WWW_AUTHENTICATE, "Bearer realm=\"uamt\""));
            a
        }
        _ => HttpResponse::Forbidden(),
    };
    Some(answer.content_type(ContentType::plaintext()).body(format!("{}\n", refusal.message)))
}

async fn metrics(req: HttpRequest, state: web::Data<HttpState>) -> HttpResponse {
    if let Some(no) = refused(&req, &state, Kind::Read) {
        return no;
    }
    let body = match &state.prometheus {
        Some(h) => render(h),
        None => crate::emit::render_seconds_totals(),
    };
    HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body(body)
}

async fn healthz(req: HttpRequest, state: web::Data<HttpState>) -> HttpResponse {
    if let Some(no) = refused(&req, &state, Kind::Read) {
        return no;
    }
    match state.board.health() {
        Ok(()) => HttpResponse::Ok().content_type(ContentType::plaintext()).body("ok\n"),
        Err(why) => HttpResponse::ServiceUnavailable().content_type(ContentType::plaintext()).body(format!("{why}\n")),
    }
}

async fn status(req: HttpRequest, state: web::Data<HttpState>) -> HttpResponse {
    if let Some(no) = refused(&req, &state, Kind::Read) {
        return no;
    }
    let mut status = state.board.snapshot();
    status.checkpoint_pending = state.controls.checkpoint_requested();
    HttpResponse::Ok().json(status)
}

/// `POST /checkpoint`: the body is read (and so limited to [`MAX_BODY`]) and ignored. Requests
/// coalesce: however many arrive during a step, one checkpoint follows it.
async fn checkpoint(req: HttpRequest, _body: web::Bytes, state: web::Data<HttpState>) -> HttpResponse {
    if let Some(no) = refused(&req, &state, Kind::Control) {
        return no;
    }
    let again = state.controls.checkpoint_requested();
    state.controls.request_checkpoint();
    let peer = req.peer_addr().map_or("unknown".to_string(), |p| p.to_string());
    if again {
        tracing::debug!(%peer, "checkpoint requested over HTTP; one is already pending");
    } else {
        tracing::info!(%peer, "checkpoint requested over HTTP; writing one after the current step");
    }
    HttpResponse::Accepted().json(serde_json::json!({
        "accepted": "checkpoint",
        "already_requested": again,
        "detail": "a checkpoint is written after the current step",
    }))
}

/// `POST /stop`: the body is read (and so limited to [`MAX_BODY`]) and ignored.
async fn stop(req: HttpRequest, _body: web::Bytes, state: web::Data<HttpState>) -> HttpResponse {
    if let Some(no) = refused(&req, &state, Kind::Control) {
        return no;
    }
    let again = state.controls.stop_requested();
    state.controls.request_stop("http");
    state.board.on_stop_requested();
    let peer = req.peer_addr().map_or("unknown".to_string(), |p| p.to_string());
    tracing::info!(%peer, "stop requested over HTTP; stopping after the current step (a checkpoint follows)");
    HttpResponse::Accepted().json(serde_json::json!({
        "accepted": "stop",
        "already_requested": again,
        "detail": "the run finishes its current step, writes a checkpoint and exits",
    }))
}

async fn not_found() -> HttpResponse {
    HttpResponse::NotFound()
        .content_type(ContentType::plaintext())
        .body("not found: try /metrics, /healthz, /status, POST /checkpoint or POST /stop\n")
}
