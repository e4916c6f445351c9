//! The conversion pipeline: source resolution, tensor planning, quantizers, writers, verification.

pub mod arch;
pub mod calib;
pub mod cli;
pub mod convert;
pub mod f64ops;
pub mod hub;
pub mod inspect;
pub mod manifest;
pub mod methods;
pub mod plan;
pub mod quantizer;
pub mod report;
pub mod rotate;
pub mod verify;
pub mod writer;
