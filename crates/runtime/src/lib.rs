//! Checkpoint reading, model architectures, CPU and CUDA backends, generation and evaluation.

pub mod checkpoint;
pub mod fixtures;
pub mod format;
