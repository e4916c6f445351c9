//! Checkpoint reading, model architectures, CPU and CUDA backends, generation and evaluation.

pub mod arch;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod error_text;
pub mod eval;
pub mod fixtures;
pub mod format;
pub mod generate;
pub mod linear;
pub mod model;
pub mod stdout;
pub mod tokenizer;
pub mod walk;
pub mod weights;
