//! Tiny random checkpoints in the genuine layout of each supported architecture.
