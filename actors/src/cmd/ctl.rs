//! `uamt ctl status|checkpoint|stop`: the operator's client for a running daemon's endpoint
//! (`telemetry.listen`), with its token (`--token-file`) and, for an HTTPS endpoint, the CA that
//! signed its certificate (`--cacert`). Every failure is an error that says what happened: nothing
//! listening, 401 (no or a wrong token), 403 (control from another host without a token on the
//! daemon), a TLS failure, or a daemon that went away.

use crate::access::Token;
use crate::client::{Answer, Endpoint};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::sync::Arc;

/// What to ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Action {
    /// Print the run's status (`GET /status`).
    Status,
    /// Ask for a checkpoint after the current step (`POST /checkpoint`).
    Checkpoint,
    /// Ask the run to finish its step, write a checkpoint and exit (`POST /stop`).
    Stop,
}

/// Arguments of `uamt ctl`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to ask the daemon.
    #[arg(value_enum)]
    pub action: Action,
    /// The daemon's address, HOST:PORT (default 127.0.0.1:9184, telemetry.listen's default).
    #[arg(long, conflicts_with = "addr_file")]
    pub addr: Option<String>,
    /// A file holding the address (what `uamt train --addr-file F` writes).
    #[arg(long, value_name = "FILE")]
    pub addr_file: Option<PathBuf>,
    /// A file holding the token to send as `Authorization: Bearer` (the daemon's
    /// telemetry.control_token_file, or its read_token_file for `status`); mode 600.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Speak HTTPS, trusting the CA certificate(s) in this PEM file (for a self-signed daemon
    /// certificate, the certificate itself).
    #[arg(long, value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// `status`: print the JSON document as the daemon sent it.
    #[arg(long)]
    pub json: bool,
}

/// The default address: `telemetry.listen`'s default.
const DEFAULT_ADDR: &str = "127.0.0.1:9184";

/// The endpoint the arguments describe.
fn endpoint(args: &Args) -> Result<Endpoint> {
    let addr = match (&args.addr, &args.addr_file) {
        (Some(a), _) => a.trim().to_string(),
        (None, Some(f)) => uamt::fsutil::read_text(f)
            .context("--addr-file: cannot read the daemon's address (is the daemon running?)")?
            .trim()
            .to_string(),
        (None, None) => DEFAULT_ADDR.to_string(),
    };
    if addr.is_empty() {
        bail!("--addr-file: the file is empty");
    }
    let addr = reachable(&addr);
    let authorization = match &args.token_file {
        Some(f) => Some(Token::from_file("--token-file", f)?.bearer()),
        None => None,
    };
    let tls = match &args.cacert {
        Some(f) => Some(Arc::new(crate::tls::client_config("--cacert", f)?)),
        None => None,
    };
    Ok(Endpoint { addr, tls, authorization })
}

/// A listen address made connectable: the daemon bound to every interface (`0.0.0.0`, `[::]`,
/// what its `--addr-file` then says) is reached on loopback.
fn reachable(addr: &str) -> String {
    match addr.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => {
            let ip: std::net::IpAddr =
                if a.is_ipv4() { std::net::Ipv4Addr::LOCALHOST.into() } else { std::net::Ipv6Addr::LOCALHOST.into() };
            std::net::SocketAddr::new(ip, a.port()).to_string()
        }
        _ => addr.to_string(),
    }
}

/// Runs `uamt ctl`.
pub fn run(args: Args) -> Result<()> {
    let ep = endpoint(&args)?;
    let (method, path) = match args.action {
        Action::Status => ("GET", "/status"),
        Action::Checkpoint => ("POST", "/checkpoint"),
        Action::Stop => ("POST", "/stop"),
    };
    let answer = ep.request(method, path)?;
    let answer = refused(&ep, &args, answer)?;
    match args.action {
        Action::Status if args.json => println!("{}", answer.body.trim_end()),
        Action::Status => {
            let v: serde_json::Value = serde_json::from_str(&answer.body)
                .with_context(|| format!("{}: /status did not answer JSON", ep.addr))?;
            print!("{}", summary(&v));
        }
        Action::Checkpoint | Action::Stop => {
            let v: serde_json::Value = serde_json::from_str(&answer.body).unwrap_or_default();
            let again = v["already_requested"].as_bool().unwrap_or(false);
            match (args.action, again) {
                (Action::Checkpoint, false) => println!("checkpoint requested: it is written after the current step"),
                (Action::Checkpoint, true) => {
                    println!("a checkpoint was already pending: one is written after the current step")
                }
                (_, false) => println!("stop requested: the run finishes its step, writes a checkpoint and exits"),
                (_, true) => println!("a stop was already requested: the run is finishing"),
            }
        }
    }
    Ok(())
}

/// The answer if it is a success, else an error in words.
fn refused(ep: &Endpoint, args: &Args, a: Answer) -> Result<Answer> {
    let said = a.body.trim();
    match a.status {
        200..=299 => Ok(a),
        401 => {
            let hint = if args.token_file.is_none() {
                "; give --token-file with the daemon's token"
            } else {
                "; --token-file does not hold the token the daemon expects"
            };
            bail!("{}: 401 Unauthorized: {said}{hint}", ep.addr)
        }
        403 => bail!("{}: 403 Forbidden: {said}", ep.addr),
        code => bail!("{}: the daemon answered {code}: {said}", ep.addr),
    }
}

/// `/status` in a few lines for a person.
fn summary(v: &serde_json::Value) -> String {
    use crate::logs::human;
    let num = |x: &serde_json::Value| x.as_f64().map_or("-".to_string(), human);
    let mut out = String::new();
    let health = if v["healthy"].as_bool() == Some(true) {
        "healthy".to_string()
    } else {
        format!("unhealthy: {}", v["unhealthy"].as_str().unwrap_or("?"))
    };
    out += &format!("phase       {} ({health})\n", v["phase"].as_str().unwrap_or("?"));
    out += &format!("iteration   {} of {}\n", v["iteration"], v["end"]);
    if let Some(s) = v["step"].as_object() {
        out += &format!(
            "loss        {} (supervised {}, consistency {}, weight {})\n",
            num(&s["loss"]),
            num(&s["supervised"]),
            num(&s["consistency"]),
            num(&s["weight"])
        );
        out += &format!("mask        {}   lr {}\n", num(&s["mask_fraction"]), num(&s["lr"]));
    }
    // The rate is measured over the first logging interval: 0 until then.
    match v["it_per_s"].as_f64().filter(|r| *r > 0.0) {
        Some(r) => out += &format!("speed       {} it/s, eta {} s\n", human(r), num(&v["eta_s"])),
        None => out += "speed       not measured yet\n",
    }
    let pending = if v["checkpoint_pending"].as_bool() == Some(true) { "pending" } else { "none pending" };
    out += &format!("checkpoint  {pending}\n");
    if let Some(e) = v["last_eval"].as_object() {
        out += &format!(
            "last eval   {} ({}): dice {}, {} case(s)\n",
            e["name"].as_str().unwrap_or("?"),
            e["source"].as_str().unwrap_or("?"),
            num(&e["dice"]),
            e["cases"]
        );
    }
    out += &format!("evaluations {} done, {} failed\n", v["evals_done"], v["evals_failed"]);
    if let Some(f) = v["failed_stage"].as_object() {
        out += &format!(
            "failed      stage {}: {}\n",
            f["stage"].as_str().unwrap_or("?"),
            f["cause"].as_str().unwrap_or("?")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_listen_addresses_are_reached_on_loopback() {
        assert_eq!(reachable("0.0.0.0:9184"), "127.0.0.1:9184");
        assert_eq!(reachable("[::]:9184"), "[::1]:9184");
        assert_eq!(reachable("192.0.2.7:1"), "192.0.2.7:1");
        assert_eq!(reachable("gpu01:9184"), "gpu01:9184");
    }

    #[test]
    fn the_status_summary_reads_like_the_logs() {
        let v = serde_json::json!({
            "phase": "training", "iteration": 120, "end": 300, "healthy": true,
            "step": {"loss": 0.5715551972389221, "supervised": 0.53, "consistency": 0.0123, "weight": 0.1,
                     "mask_fraction": 0.76, "lr": 0.01},
            "it_per_s": 7.81234, "eta_s": 23.0, "checkpoint_pending": true, "evals_done": 1, "evals_failed": 0,
            "last_eval": {"name": "iter_100", "source": "periodic", "dice": 0.81234, "cases": 2},
        });
        let s = summary(&v);
        for want in [
            "training (healthy)",
            "120 of 300",
            "loss        0.572",
            "mask        0.76",
            "lr 0.01",
            "7.81 it/s",
            "pending",
            "dice 0.812",
        ] {
            assert!(s.contains(want), "{want:?} not in\n{s}");
        }
    }
}
