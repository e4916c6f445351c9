//! Calibration: our calibration set and recipes ([`data`]), the per-Linear input statistics
//! gathered by running the BF16 model through the runtime ([`stats`]), and the report of how
//! many tokens each MoE expert received ([`coverage`]); the model's own calibration text
//! ([`selfgen`]).

pub mod cli;
pub mod coverage;
pub mod data;
pub mod run;
pub mod selfgen;
pub mod sequential;
pub mod stats;

pub use coverage::{Coverage, ExpertCoverage};
pub use data::{load_sequences, CalibData, DataError, Recipe};
pub use run::{calibrate, CalibError, CalibRun, Progress};
pub use selfgen::{Continuer, CpuContinuer, GpuContinuer, SelfGenError, SelfGenerate};
pub use sequential::{
    run_sequential, run_sequential_with, SequentialError, SequentialModes, SequentialRun,
};
pub use stats::{collect, CalibStats, CollectOptions, LinearStats, StatsError};
