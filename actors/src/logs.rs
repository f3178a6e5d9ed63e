//! The log lines on stderr: text for people, with numbers rounded to what a person reads
//! (`loss=0.572 mask=0.76 lr=0.01 it/s=7.8`), or one JSON object per line at full precision for
//! log collectors; and the default filter, which keeps the HTTP server's own start-up and shutdown
//! lines (`actix_server`) at debug level.

use std::fmt;
use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::Writer;

/// The format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, numbers rounded to three significant digits.
    Text,
    /// One JSON object per line, numbers at full precision.
    Json,
}

/// `v` as a person reads it: three significant digits without trailing zeros (`0.572`, `0.76`,
/// `0.01`, `7.8`, `473`), integers of four digits or more in full, an exponent below 1e-4.
pub fn human(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    if v == 0.0 {
        return "0".into();
    }
    let magnitude = v.abs().log10().floor() as i32;
    if magnitude < -4 {
        let s = format!("{v:.2e}");
        let (mantissa, exponent) = s.split_once('e').unwrap_or((&s, "0"));
        return format!("{}e{exponent}", trim_zeros(mantissa));
    }
    let decimals = (2 - magnitude).max(0) as usize;
    trim_zeros(&format!("{v:.decimals$}")).to_string()
}

/// `1.500` -> `1.5`, `2.000` -> `2`; text without a decimal point stays.
fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// The filter directives: `RUST_LOG` (default `info`), with `actix_server=warn` added unless
/// `RUST_LOG` names `actix_server` itself or asks for debug or trace everywhere: the HTTP
/// server's `starting N workers`, `Actix runtime found`, `shutting down idle worker` lines are
/// for debugging, and the daemon logs where it serves on its own.
pub fn filter_directives(rust_log: Option<&str>) -> String {
    let base = rust_log.map(str::trim).filter(|s| !s.is_empty()).unwrap_or("info");
    let verbose = base.split(',').any(|d| matches!(d.trim().to_ascii_lowercase().as_str(), "debug" | "trace"));
    if verbose || base.contains("actix_server") {
        base.to_string()
    } else {
        format!("{base},actix_server=warn")
    }
}

/// The subscriber writing `format` lines to `writer`, coloured when `colour`. A line that cannot
/// be written (stderr gone: the terminal of a run started without nohup closed) is dropped:
/// tracing-subscriber's own report of the failed write is an `eprintln!` to that same stderr,
/// which panics the logging thread (the training thread before its final checkpoint, the
/// supervisor before the exit).
pub fn subscriber<W>(format: LogFormat, colour: bool, writer: W) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    with_directives(format, colour, writer, &filter_directives(std::env::var("RUST_LOG").ok().as_deref()))
}

/// [`subscriber`] with the filter `directives`.
fn with_directives<W>(
    format: LogFormat,
    colour: bool,
    writer: W,
    directives: &str,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_new(directives).unwrap_or_else(|e| {
        eprintln!("RUST_LOG `{directives}` is not a filter ({e}); logging at info");
        tracing_subscriber::EnvFilter::new(filter_directives(None))
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).log_internal_errors(false);
    match format {
        LogFormat::Text => Box::new(builder.fmt_fields(HumanFields).with_ansi(colour).finish()),
        LogFormat::Json => Box::new(builder.json().with_ansi(false).finish()),
    }
}

/// The text format's fields: like tracing-subscriber's default (`message key=value ...`), with
/// floating-point values through [`human`].
#[derive(Debug, Clone, Copy, Default)]
pub struct HumanFields;

impl<'w> MakeVisitor<Writer<'w>> for HumanFields {
    type Visitor = HumanVisitor<'w>;

    fn make_visitor(&self, target: Writer<'w>) -> Self::Visitor {
        HumanVisitor { writer: target, first: true, result: Ok(()) }
    }
}

/// Writes one event's or span's fields.
pub struct HumanVisitor<'w> {
    /// Where the line goes.
    writer: Writer<'w>,
    /// Nothing written yet (no separating space).
    first: bool,
    /// The first write error.
    result: fmt::Result,
}

impl HumanVisitor<'_> {
    /// Writes `name=value` (or the message alone), separated from what came before.
    fn field(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return; // log metadata (tracing-log) is already in the line's prefix
        }
        if !std::mem::take(&mut self.first) {
            self.result = self.writer.write_char(' ');
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.result = self.result.and_then(|_| match (name, self.writer.has_ansi_escapes()) {
            ("message", _) => self.writer.write_fmt(value),
            (name, true) => write!(self.writer, "\x1b[3m{name}\x1b[0m\x1b[2m=\x1b[0m{value}"),
            (name, false) => write!(self.writer, "{name}={value}"),
        });
    }
}

impl Visit for HumanVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.field(field, format_args!("{}", human(value)));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.field(field, format_args!("{value}"));
        } else {
            self.field(field, format_args!("{value:?}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, format_args!("{value:?}"));
    }
}

impl VisitOutput<fmt::Result> for HumanVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for HumanVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn numbers_are_rounded_for_people() {
        for (v, want) in [
            (0.5715551972389221, "0.572"),
            (0.76, "0.76"),
            (0.7600000001, "0.76"),
            (0.01, "0.01"),
            (7.8, "7.8"),
            (7.8123, "7.81"),
            (472.66, "473"),
            (12345.6, "12346"),
            (0.99951, "1"),
            (-0.5715, "-0.572"),
            (1e-4, "0.0001"),
            (3.2e-9, "3.2e-9"),
            (0.0, "0"),
            (-0.0, "0"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "inf"),
        ] {
            assert_eq!(human(v), want, "{v}");
        }
    }

    #[test]
    fn actix_server_is_quiet_unless_asked_for() {
        assert_eq!(filter_directives(None), "info,actix_server=warn");
        assert_eq!(filter_directives(Some("")), "info,actix_server=warn");
        assert_eq!(filter_directives(Some("warn")), "warn,actix_server=warn");
        assert_eq!(filter_directives(Some("debug")), "debug");
        assert_eq!(filter_directives(Some("info,uamt=trace")), "info,uamt=trace,actix_server=warn");
        assert_eq!(filter_directives(Some("info,actix_server=info")), "info,actix_server=info");
    }

    /// A writer collecting what the subscriber writes.
    #[derive(Clone, Default)]
    struct Collect(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Collect {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(format: LogFormat) -> String {
        let out = Collect::default();
        let writer = out.clone();
        let sub = with_directives(format, false, move || writer.clone(), &filter_directives(None));
        tracing::subscriber::with_default(sub, || {
            tracing::info!(iteration = 120, loss = 0.5715551972389221, "it/s" = 7.8123, name = "x", "training");
            tracing::info!(target: "actix_server::builder", "starting 2 workers");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text
    }

    #[test]
    fn text_lines_round_and_json_lines_keep_full_precision() {
        let text = logged(LogFormat::Text);
        assert!(text.contains("training iteration=120 loss=0.572 it/s=7.81 name=\"x\""), "{text}");
        assert!(!text.contains("starting 2 workers"), "actix_server's info lines are debug-only: {text}");
        let json = logged(LogFormat::Json);
        let v: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
        assert_eq!(v["fields"]["loss"], 0.5715551972389221);
        assert_eq!(v["fields"]["it/s"], 7.8123);
    }
}
