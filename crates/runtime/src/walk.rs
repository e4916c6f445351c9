//! Layer-at-a-time execution for calibration: one trait that the CPU [`Model`] and the CUDA
//! [`GpuModel`] both implement, so that the quantizer's sequential walk (embed, run one decoder
//! layer with every Linear's input shown to an observer, replace that layer's weights by their
//! quantized versions, run it again) does not depend on the backend.

use crate::config::ModelConfig;
use crate::cuda::{GpuError, GpuModel};
use crate::linear::Weight;
use crate::model::{ForwardError, LinearObserver, Model, ReplaceError, Site};

/// Why a step of a layer-at-a-time walk failed.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    /// Bad input for the forward pass (token out of range, wrong hidden-state length).
    #[error(transparent)]
    Forward(#[from] ForwardError),
    /// The new weight does not fit the layer, or no Linear has that name.
    #[error(transparent)]
    Replace(#[from] ReplaceError),
    /// The GPU backend failed (boxed: the error is large).
    #[error(transparent)]
    Gpu(Box<GpuError>),
}

impl From<GpuError> for WalkError {
    fn from(e: GpuError) -> WalkError {
        match e {
            GpuError::Forward(f) => WalkError::Forward(f),
            other => WalkError::Gpu(Box::new(other)),
        }
    }
}

/// A decoder that runs one layer at a time over one sequence's hidden states.
pub trait LayerWalk {
    /// The model's configuration.
    fn config(&self) -> &ModelConfig;
    /// Where the layers run, for reports: "cpu" or "cuda".
    fn backend(&self) -> &'static str;
    /// The device's name for reports (the GPU's name; "cpu").
    fn device_name(&self) -> String;
    /// Device memory in use (total minus free, every process's), bytes; None on the CPU.
    fn device_memory_used(&self) -> Option<u64> {
        None
    }
    /// Whether [`LinearObserver::routed`] calls carry the routing weights (the CPU's do; the
    /// GPU does not read them back).
    fn reports_route_weights(&self) -> bool {
        false
    }
    /// Hidden states `[m, hidden]` (f32) entering layer 0 for `tokens`.
    fn embed_tokens(&mut self, tokens: &[u32]) -> Result<Vec<f32>, WalkError>;
    /// Runs decoder layer `layer` in place on `x` (`[m, hidden]`, one sequence at positions
    /// `0..m`), showing every Linear's input to `obs`.
    fn forward_layer_observed(
        &mut self,
        layer: usize,
        x: &mut [f32],
        obs: &mut dyn LinearObserver,
    ) -> Result<(), WalkError>;
    /// Replaces the weight of the decoder-layer Linear `module` (checkpoint module name) with
    /// `weight` of the same shape (its quantized version), keeping the bias.
    fn replace_linear_weight(&mut self, module: &str, weight: Weight) -> Result<(), WalkError>;
    /// The final RMSNorm, in place, on hidden states `x` (`[m, hidden]`, f32) leaving the last
    /// decoder layer: the lm_head's input. Computed on the host in f32 by both backends (the
    /// CPU runtime's formula), for calibration statistics.
    fn final_norm(&mut self, x: &mut [f32]) -> Result<(), WalkError>;
    /// Asks the backend to sum every site's statistics itself (on the device) during the
    /// following [`LayerWalk::forward_layer_observed`] calls instead of showing each input to
    /// the observer; `all_token_experts` as [`LinearObserver::all_token_experts`], `hessian`:
    /// whether the whole `sum x x^T` comes back or only its diagonal. Returns false where the
    /// backend cannot (the CPU): the observer then sees every input as usual.
    fn begin_device_sums(
        &mut self,
        _all_token_experts: bool,
        _hessian: bool,
    ) -> Result<bool, WalkError> {
        Ok(false)
    }
    /// Ends the summing started by [`LayerWalk::begin_device_sums`]: every site's sums, in site
    /// order (empty where none was started).
    fn take_device_sums(&mut self) -> Result<Vec<SiteSums>, WalkError> {
        Ok(Vec::new())
    }
}

/// The statistics of one site's inputs summed by a backend over a layer's calibration pass.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteSums {
    /// The site.
    pub site: Site,
    /// Input features.
    pub k: usize,
    /// Input rows summed (tokens; routed tokens for an expert).
    pub rows: u64,
    /// Largest |x|.
    pub amax: f32,
    /// Per feature, `sum_t x_t^2` (`[k]`, the diagonal of `gram`).
    pub sum_sq: Vec<f64>,
    /// `sum_t x_t x_t^T`, `[k, k]` row-major, where the summing was begun with `hessian`.
    pub gram: Option<Vec<f64>>,
}

impl LayerWalk for Model {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn backend(&self) -> &'static str {
        "cpu"
    }
    fn device_name(&self) -> String {
        "cpu".into()
    }
    fn reports_route_weights(&self) -> bool {
        true
    }
    fn embed_tokens(&mut self, tokens: &[u32]) -> Result<Vec<f32>, WalkError> {
        Ok(Model::embed_tokens(self, tokens)?)
    }
    fn forward_layer_observed(
        &mut self,
        layer: usize,
        x: &mut [f32],
        obs: &mut dyn LinearObserver,
    ) -> Result<(), WalkError> {
        Ok(Model::forward_layer_observed(self, layer, x, obs)?)
    }
    fn replace_linear_weight(&mut self, module: &str, weight: Weight) -> Result<(), WalkError> {
        Ok(Model::replace_linear_weight(self, module, weight)?)
    }
    fn final_norm(&mut self, x: &mut [f32]) -> Result<(), WalkError> {
        Ok(Model::final_norm_rows(self, x)?)
    }
}

impl LayerWalk for GpuModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn backend(&self) -> &'static str {
        "cuda"
    }
    fn device_name(&self) -> String {
        self.gpu().ctx.device_name().to_string()
    }
    fn device_memory_used(&self) -> Option<u64> {
        let (free, total) = self.gpu().mem_info().ok()?;
        Some(total.saturating_sub(free) as u64)
    }
    fn embed_tokens(&mut self, tokens: &[u32]) -> Result<Vec<f32>, WalkError> {
        Ok(GpuModel::embed_rows(self, tokens)?)
    }
    fn forward_layer_observed(
        &mut self,
        layer: usize,
        x: &mut [f32],
        obs: &mut dyn LinearObserver,
    ) -> Result<(), WalkError> {
        Ok(GpuModel::forward_layer_observed(self, layer, x, obs)?)
    }
    fn replace_linear_weight(&mut self, module: &str, weight: Weight) -> Result<(), WalkError> {
        GpuModel::replace_linear_weight(self, module, weight)
    }
    fn final_norm(&mut self, x: &mut [f32]) -> Result<(), WalkError> {
        Ok(GpuModel::final_norm_rows(self, x)?)
    }
    fn begin_device_sums(
        &mut self,
        all_token_experts: bool,
        hessian: bool,
    ) -> Result<bool, WalkError> {
        GpuModel::begin_device_sums(self, all_token_experts, hessian);
        Ok(true)
    }
    fn take_device_sums(&mut self) -> Result<Vec<SiteSums>, WalkError> {
        Ok(GpuModel::take_device_sums(self)?)
    }
}
