//! The conversion pipeline: source resolution, tensor planning, quantizers, writers, verification.
pub mod hub;
