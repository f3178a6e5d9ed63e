//! Fault injection for the lifecycle tests: `uamt train` with `UAMT_FAULT=<stage>@<iteration>`
//! (stage `teacher`, `student` or `dispatcher`) makes that stage panic when it reaches that
//! iteration, as an allocation failure inside libtorch would; `UAMT_HOLD=<iteration>:<file>` makes
//! the student wait before that step while the file exists (or until a stop is asked for), as a
//! stage stuck in a kernel looks from outside. Unset, each costs one comparison.

use std::path::PathBuf;
use std::time::Duration;

/// Where to fail, if anywhere.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fault {
    /// The stage that fails.
    pub stage: String,
    /// At this iteration.
    pub iteration: i64,
}

impl Fault {
    /// Parses `stage@iteration`.
    pub fn parse(s: &str) -> Option<Fault> {
        let (stage, it) = s.split_once('@')?;
        Some(Fault { stage: stage.to_string(), iteration: it.parse().ok()? })
    }

    /// From the `UAMT_FAULT` environment variable.
    pub fn from_env() -> Option<Fault> {
        std::env::var("UAMT_FAULT").ok().and_then(|s| Fault::parse(&s))
    }
}

/// Panics if `fault` names `stage` at `iteration`.
pub fn check(fault: &Option<Fault>, stage: &str, iteration: i64) {
    if let Some(f) = fault {
        if f.stage == stage && f.iteration == iteration {
            panic!("injected fault in the {stage} stage at iteration {iteration} (UAMT_FAULT)");
        }
    }
}

/// Where the student waits, and on what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// Before this step (this many steps done).
    pub iteration: i64,
    /// While this file exists.
    pub file: PathBuf,
}

impl Hold {
    /// Parses `iteration:file`.
    pub fn parse(s: &str) -> Option<Hold> {
        let (it, file) = s.split_once(':')?;
        Some(Hold { iteration: it.parse().ok()?, file: PathBuf::from(file) })
    }

    /// From the `UAMT_HOLD` environment variable.
    pub fn from_env() -> Option<Hold> {
        std::env::var("UAMT_HOLD").ok().and_then(|s| Hold::parse(&s))
    }
}

/// Waits while `hold` names `iteration` and its file exists, until `stop()` says so.
pub fn hold(hold: &Option<Hold>, iteration: i64, stop: impl Fn() -> bool) {
    let Some(h) = hold.as_ref().filter(|h| h.iteration == iteration) else { return };
    tracing::warn!(iteration, file = %h.file.display(), "holding before this step while the file exists (UAMT_HOLD)");
    while h.file.exists() && !stop() {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_and_holds_parse() {
        assert_eq!(Fault::parse("teacher@3"), Some(Fault { stage: "teacher".into(), iteration: 3 }));
        assert_eq!(Fault::parse("teacher"), None);
        assert_eq!(Hold::parse("4:/tmp/x:y"), Some(Hold { iteration: 4, file: PathBuf::from("/tmp/x:y") }));
        assert_eq!(Hold::parse("x:/tmp/x"), None);
    }

    #[test]
    fn a_hold_ends_when_its_file_is_gone_or_a_stop_comes() {
        let h = Some(Hold { iteration: 2, file: PathBuf::from("/nonexistent/uamt-hold") });
        hold(&h, 2, || false); // no file: no wait
        let h = Some(Hold { iteration: 2, file: PathBuf::from("/") });
        hold(&h, 1, || panic!("not this iteration"));
        hold(&h, 2, || true); // the file exists, the stop ends the wait
    }
}
