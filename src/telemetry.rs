//! Names of every metric the daemon exports, in one place: an enum with the Prometheus name,
//! type and meaning of each. Labels take bounded values only (queue and stage names, loss terms,
//! checkpoint slots); nothing is emitted per voxel or per element.

/// Prometheus metric types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Monotonic count (`_total`).
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A distribution (`_seconds`).
    Histogram,
}

/// Every metric of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Iterations,
    IterationSeconds,
    Loss,
    ConsistencyWeight,
    Threshold,
    MaskFraction,
    LearningRate,
    ItPerSecond,
    QueueDepth,
    QueueCapacity,
    QueuePushed,
    QueuePopped,
    QueueBlockedSeconds,
    StageBusySeconds,
    StageIdleSeconds,
    StageItems,
    CheckpointWrites,
    CheckpointFailures,
    CheckpointSeconds,
    SkippedCases,
    SkippedSteps,
    EvalRuns,
    EvalFailures,
    EvalScore,
    RankRuns,
    RankFailures,
    RankSeconds,
    RankScore,
    RankCases,
}

impl Metric {
    /// Every metric, for describing them all at start-up and for the README table.
    pub const ALL: [Metric; 29] = [
        Metric::Iterations,
        Metric::IterationSeconds,
        Metric::Loss,
        Metric::ConsistencyWeight,
        Metric::Threshold,
        Metric::MaskFraction,
        Metric::LearningRate,
        Metric::ItPerSecond,
        Metric::QueueDepth,
        Metric::QueueCapacity,
        Metric::QueuePushed,
        Metric::QueuePopped,
        Metric::QueueBlockedSeconds,
        Metric::StageBusySeconds,
        Metric::StageIdleSeconds,
        Metric::StageItems,
        Metric::CheckpointWrites,
        Metric::CheckpointFailures,
        Metric::CheckpointSeconds,
        Metric::SkippedCases,
        Metric::SkippedSteps,
        Metric::EvalRuns,
        Metric::EvalFailures,
        Metric::EvalScore,
        Metric::RankRuns,
        Metric::RankFailures,
        Metric::RankSeconds,
        Metric::RankScore,
        Metric::RankCases,
    ];

    /// The Prometheus name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Metric::Iterations => "uamt_iterations_total",
            Metric::IterationSeconds => "uamt_iteration_seconds",
            Metric::Loss => "uamt_loss",
            Metric::ConsistencyWeight => "uamt_consistency_weight",
            Metric::Threshold => "uamt_uncertainty_threshold",
            Metric::MaskFraction => "uamt_mask_fraction",
            Metric::LearningRate => "uamt_learning_rate",
            Metric::ItPerSecond => "uamt_iterations_per_second",
            Metric::QueueDepth => "uamt_queue_depth",
            Metric::QueueCapacity => "uamt_queue_capacity",
            Metric::QueuePushed => "uamt_queue_pushed_total",
            Metric::QueuePopped => "uamt_queue_popped_total",
            Metric::QueueBlockedSeconds => "uamt_queue_blocked_seconds_total",
            Metric::StageBusySeconds => "uamt_stage_busy_seconds_total",
            Metric::StageIdleSeconds => "uamt_stage_idle_seconds_total",
            Metric::StageItems => "uamt_stage_items_total",
            Metric::CheckpointWrites => "uamt_checkpoint_writes_total",
            Metric::CheckpointFailures => "uamt_checkpoint_failures_total",
            Metric::CheckpointSeconds => "uamt_checkpoint_write_seconds",
            Metric::SkippedCases => "uamt_skipped_cases_total",
            Metric::SkippedSteps => "uamt_skipped_steps_total",
            Metric::EvalRuns => "uamt_eval_runs_total",
            Metric::EvalFailures => "uamt_eval_failures_total",
            Metric::EvalScore => "uamt_eval_score",
            Metric::RankRuns => "uamt_rank_runs_total",
            Metric::RankFailures => "uamt_rank_failures_total",
            Metric::RankSeconds => "uamt_rank_seconds",
            Metric::RankScore => "uamt_rank_score",
            Metric::RankCases => "uamt_rank_cases",
        }
    }

    /// The Prometheus type.
    pub const fn kind(self) -> MetricKind {
        use Metric::*;
        match self {
            Iterations | QueuePushed | QueuePopped | QueueBlockedSeconds | StageBusySeconds | StageIdleSeconds
            | StageItems | CheckpointWrites | CheckpointFailures | SkippedCases | SkippedSteps | EvalRuns
            | EvalFailures | RankRuns | RankFailures => MetricKind::Counter,
            IterationSeconds | CheckpointSeconds | RankSeconds => MetricKind::Histogram,
            _ => MetricKind::Gauge,
        }
    }

    /// What it means (the HELP line), labels included.
    pub const fn help(self) -> &'static str {
        match self {
            Metric::Iterations => "Training iterations completed.",
            Metric::IterationSeconds => "Wall time of one training iteration as the student sees it.",
            Metric::Loss => "Latest loss terms; label term: total, supervised, ce, dice or consistency.",
            Metric::ConsistencyWeight => "Consistency weight of the latest iteration.",
            Metric::Threshold => "Uncertainty threshold (nats) of the latest iteration.",
            Metric::MaskFraction => "Fraction of unlabelled voxels under the threshold in the latest iteration.",
            Metric::LearningRate => "Learning rate of the latest iteration.",
            Metric::ItPerSecond => "Iterations per second over the last logging interval.",
            Metric::QueueDepth => "Items waiting in a queue; label queue.",
            Metric::QueueCapacity => "Capacity of a queue; label queue.",
            Metric::QueuePushed => "Items pushed into a queue; label queue.",
            Metric::QueuePopped => "Items taken from a queue; label queue.",
            Metric::QueueBlockedSeconds => "Seconds spent blocked on a queue; labels queue and side (push: waiting on a full queue, pop: on an empty one).",
            Metric::StageBusySeconds => "Seconds a pipeline stage spent working; label stage.",
            Metric::StageIdleSeconds => "Seconds a pipeline stage spent waiting on its queues; label stage.",
            Metric::StageItems => "Items a pipeline stage finished; label stage.",
            Metric::CheckpointWrites => "Checkpoints written.",
            Metric::CheckpointFailures => "Checkpoint writes that failed (the previous checkpoints stay).",
            Metric::CheckpointSeconds => "Time to write one checkpoint.",
            Metric::SkippedCases => "Batches or cases skipped because their data could not be read.",
            Metric::SkippedSteps => "Training steps whose SGD update was skipped because their loss or gradients were not finite (optim.on_nonfinite = \"skip\").",
            Metric::EvalRuns => "Evaluations finished; label source: periodic or watch.",
            Metric::EvalFailures => "Checkpoints that could not be evaluated (corrupt, unreadable).",
            Metric::EvalScore => "Mean evaluation score; labels metric (dice, jaccard, hd95, asd) and checkpoint (periodic or watch).",
            Metric::RankRuns => "Rankings of the unlabelled training cases finished ([rank] every).",
            Metric::RankFailures => "Rankings of the unlabelled training cases that failed.",
            Metric::RankSeconds => "Time to rank the unlabelled training cases once.",
            Metric::RankScore => "The latest ranking's score (rank.score) over the unlabelled cases; label stat: min, median, max or mean (cases with an undefined score left out).",
            Metric::RankCases => "Cases in the latest ranking; label score: defined or undefined (nothing segmented).",
        }
    }
}
