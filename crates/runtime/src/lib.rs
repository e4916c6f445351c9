//! Checkpoint reading, model architectures, CPU and CUDA backends, generation and evaluation.

pub mod arch;
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod fixtures;
pub mod format;
pub mod linear;
pub mod model;
pub mod weights;
pub mod eval;
pub mod generate;
pub mod tokenizer;
