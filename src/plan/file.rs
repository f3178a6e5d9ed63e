//! The planned config as a TOML file with a comment on every value saying where it comes from,
//! checked by parsing it back: what is written is exactly the plan's [`Config`].

use crate::config::Config;
use crate::{Error, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// A value as TOML writes it inline (`6000`, `"uamt"`, `[112, 112, 80]`).
fn lit(v: impl Serialize) -> String {
    toml::Value::try_from(v).map(|v| v.to_string()).unwrap_or_else(|e| format!("\"<{e}>\""))
}

/// The keys the file sets, by section, with their values in `cfg`. Every other key keeps its
/// default (the recipe's).
fn entries(cfg: &Config) -> Vec<(&'static str, Vec<(&'static str, String)>)> {
    let (d, m, me, o) = (&cfg.data, &cfg.model, &cfg.method, &cfg.optim);
    let (q, dev, ck, e, t) = (&cfg.queues, &cfg.device, &cfg.checkpoint, &cfg.eval, &cfg.telemetry);
    vec![
        (
            "data",
            vec![
                ("dataset", lit(&d.dataset)),
                ("patch", lit(d.loader.patch)),
                ("labelled_bs", lit(d.sampler.labelled_bs)),
                ("unlabelled_bs", lit(d.sampler.unlabelled_bs)),
            ],
        ),
        (
            "model",
            vec![("n_classes", lit(m.n_classes)), ("n_filters", lit(m.n_filters)), ("dropout_p", lit(m.dropout_p))],
        ),
        (
            "method",
            vec![
                ("kind", lit(me.kind)),
                ("mc_passes", lit(me.mc_passes)),
                ("mc_repeats", lit(me.mc_repeats)),
                ("consistency", lit(me.consistency)),
                ("consistency_interval", lit(me.consistency_interval)),
                ("consistency_rampup", lit(me.consistency_rampup)),
                ("ema_decay", lit(me.ema_decay)),
                ("teacher_lag", lit(me.teacher_lag)),
            ],
        ),
        (
            "optim",
            vec![
                ("iterations", lit(o.iterations)),
                ("base_lr", lit(o.base_lr)),
                ("lr_step", lit(o.lr_step)),
                ("lr_gamma", lit(o.lr_gamma)),
                ("seed", lit(o.seed)),
            ],
        ),
        ("queues", vec![("batches", lit(q.batches)), ("loader_workers", lit(q.loader_workers))]),
        ("device", vec![("device", lit(&dev.device)), ("precision", lit(dev.precision))]),
        ("checkpoint", vec![("dir", lit(&ck.dir)), ("every", lit(ck.every)), ("keep", lit(ck.keep))]),
        (
            "eval",
            vec![
                ("every", lit(e.every)),
                ("report_dir", lit(&e.report_dir)),
                ("patch", lit(e.window.patch)),
                ("stride", lit(e.window.stride)),
                ("batch_size", lit(e.window.batch_size)),
            ],
        ),
        (
            "telemetry",
            vec![("listen", lit(&t.listen)), ("log_every", lit(t.log_every)), ("stall_after_s", lit(t.stall_after_s))],
        ),
    ]
}

/// Every key the file sets, as `section.key`.
pub fn keys(cfg: &Config) -> Vec<String> {
    entries(cfg).into_iter().flat_map(|(s, kv)| kv.into_iter().map(move |(k, _)| format!("{s}.{k}"))).collect()
}

/// `text` as `# ` comment lines (wrapped at about 96 columns).
fn comment(text: &str, out: &mut String) {
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.len() + 1 + word.len() > 96 && line.len() > 1 {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
}

/// The config file: `header` as comment lines, then every section with each key's `comments`
/// entry (by `section.key`) above it. Refused (an internal error naming the key) when a key has
/// no comment or the text does not parse back to `cfg`.
pub fn write(cfg: &Config, comments: &BTreeMap<String, String>, header: &[String]) -> Result<String> {
    let mut out = String::new();
    for h in header {
        comment(h, &mut out);
    }
    for (section, kv) in entries(cfg) {
        out.push_str(&format!("\n[{section}]\n"));
        for (key, value) in kv {
            let full = format!("{section}.{key}");
            let why = comments
                .get(&full)
                .ok_or_else(|| Error::invalid(&full, "the plan gives no reason for it (a bug in the planner)"))?;
            comment(why, &mut out);
            out.push_str(&format!("{key} = {value}\n"));
        }
    }
    let back = Config::from_toml(&out, Path::new("<planned config>"))?;
    if &back != cfg {
        return Err(Error::invalid("plan", "the written config does not read back as planned (a bug in the planner)"));
    }
    Ok(out)
}
