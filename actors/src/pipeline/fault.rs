//! Fault injection for the lifecycle tests: `uamt train` with `UAMT_FAULT=<stage>@<iteration>`
//! (stage `teacher`, `student` or `dispatcher`) makes that stage panic when it reaches that
//! iteration, as an allocation failure inside libtorch would. Unset, it costs one comparison.

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
