//! MSE / GPTQ with sequential calibration: every decoder-layer Linear the plan quantizes is
//! quantized while calibration walks the model one layer at a time
//! ([`crate::calib::sequential`]), from statistics gathered on the outputs of the already
//! quantized layers before it; the results are handed to the converter through
//! [`super::QuantOptions::precomputed`].
//!
//! The per-tensor global scales are those the converter uses: the same plan, the same amax pass
//! and the same sharing within fused sets ([`crate::quantizer::own_scale`],
//! [`crate::quantizer::shared_scale`]); the converter checks that they agree
//! ([`super::ApplyError::ScaleMismatch`]).
//!
//! Memory: besides one layer's statistics and the hidden states, the quantized weights of the
//! layers done so far are held (the size of the FP4 output).

use std::collections::BTreeMap;
use std::sync::Arc;

use mimo_kernels::fp4::{Fp4Format, Fp4Matrix};
use mimo_runtime::arch::Names;
use mimo_runtime::checkpoint::{Checkpoint, TensorView};
use mimo_runtime::linear::Weight;
use mimo_runtime::walk::LayerWalk;
use rayon::prelude::*;

use super::apply::{kernel_global_scale, quantize_with_stats, read_weight};
use super::gptq::{
    asymmetric_target, gptq_factor, quantize_gptq_factored, GptqFactor, GptqOptions,
};
use super::mse::{search_global_scale, ScaleMember};
use super::{ApplyError, Method, MethodError};
use crate::calib::data::CalibData;
use crate::calib::sequential::{
    run_sequential_with, SequentialError, SequentialModes, SequentialRun,
};
use crate::calib::stats::{CollectOptions, LinearStats};
use crate::plan::{Action, Plan};
use crate::quantizer::{amax, own_scale, shared_scale, src_dtype};

/// One Linear to quantize: its source tensor and the converter's per-tensor scale.
#[derive(Debug, Clone)]
struct Target {
    tensor: String,
    scale: Option<f32>,
}

/// The converter's per-tensor scale of every tensor the plan quantizes, by module name.
fn targets(ck: &Checkpoint, plan: &Plan) -> Result<BTreeMap<String, Target>, SequentialError> {
    let layout = plan.layout;
    let mut out: BTreeMap<String, Target> = BTreeMap::new();
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in &plan.entries {
        if let Action::Quantize { module, group, .. } = &e.action {
            let t = ck.tensor(&e.name)?;
            let a = amax(&t).map_err(ApplyError::from)?;
            let scale = own_scale(layout, a, src_dtype(&t).map_err(ApplyError::from)?);
            ck.release(&e.name);
            out.insert(
                module.clone(),
                Target {
                    tensor: e.name.clone(),
                    scale,
                },
            );
            if let Some(g) = group {
                groups.entry(g.clone()).or_default().push(module.clone());
            }
        }
    }
    for members in groups.values() {
        let shared = shared_scale(layout, members.iter().filter_map(|m| out[m].scale));
        for m in members {
            if let Some(t) = out.get_mut(m) {
                t.scale = shared;
            }
        }
    }
    Ok(out)
}

/// The f32 weight of source tensor `t` that `method` quantizes for a Linear with statistics
/// `s`: the source itself, or with asymmetric calibration its least-squares target.
fn source_weight(
    t: &TensorView<'_>,
    s: &LinearStats,
    method: Method,
    gptq: &GptqOptions,
    asymmetric: Option<f64>,
) -> Result<Vec<f32>, SequentialError> {
    let w = read_weight(t)?;
    let (Some(c), Some(h), Some(alpha)) = (&s.cross, &s.hessian, asymmetric) else {
        return Ok(w);
    };
    let (n, k) = (t.shape[0], t.shape[1]);
    asymmetric_target(&w, n, k, h, c, gptq.damp, alpha).map_err(|source| {
        ApplyError::Method {
            file: t.file.to_path_buf(),
            tensor: t.name.to_string(),
            method: method.name(),
            source,
        }
        .into()
    })
}

/// Quantizes one Linear (`module`, source tensor and scale in `target`) from its statistics;
/// GPTQ uses `factor` (its group's) where given.
#[allow(clippy::too_many_arguments)]
fn quantize_target(
    ck: &Checkpoint,
    module: &str,
    target: &Target,
    s: &LinearStats,
    factor: Option<&GptqFactor>,
    layout: mimo_runtime::format::Layout,
    method: Method,
    gptq: &GptqOptions,
    asymmetric: Option<f64>,
) -> Result<(String, Fp4Matrix), SequentialError> {
    let t = ck.tensor(&target.tensor)?;
    let merr = |source| ApplyError::Method {
        file: t.file.to_path_buf(),
        tensor: t.name.to_string(),
        method: method.name(),
        source,
    };
    let w = source_weight(&t, s, method, gptq, asymmetric)?;
    let (n, k) = (t.shape[0], t.shape[1]);
    let gs = kernel_global_scale(layout, target.scale);
    let m = match (method, factor) {
        (Method::Gptq, Some(f)) => quantize_gptq_factored(&w, n, k, gs, f, gptq).map_err(merr)?,
        _ => quantize_with_stats(&t, module, &w, layout, gs, method, gptq, Some(s))?,
    };
    m.validate().map_err(|e| merr(MethodError::Fp4(e)))?;
    ck.release(&target.tensor);
    Ok((module.to_string(), m))
}

/// What sequential calibration quantized: every decoder-layer Linear's weight, and the tensor
/// scales (the layout's stored value) that the NVFP4 `mse` search moved from the converter's.
#[derive(Debug, Clone, Default)]
pub struct Precomputed {
    /// Quantized weights by module name.
    pub weights: BTreeMap<String, Fp4Matrix>,
    /// Searched tensor scales by module name (members of a fused set share theirs).
    pub scales: BTreeMap<String, f32>,
}

/// NVFP4 with `--mse-scale-search` on one group of Linears sharing their input statistics:
/// members that share a tensor scale (a fused set: q/k/v, gate/up) get one searched scale
/// ([`super::mse::search_global_scale`]); a member with a scale of its own is searched alone.
/// `mse` keeps the search's own blocks; `gptq` (with the group's `factor`) quantizes each member
/// with the chosen scale.
fn searched_group(
    ck: &Checkpoint,
    group: &[(&String, &Target, &Arc<LinearStats>)],
    layout: mimo_runtime::format::Layout,
    method: Method,
    factor: Option<&GptqFactor>,
    gptq: &GptqOptions,
    asymmetric: Option<f64>,
) -> Result<Vec<(String, Fp4Matrix, Option<f32>)>, SequentialError> {
    let mut by_scale: Vec<(f32, Vec<usize>)> = Vec::new();
    for (i, (_, t, _)) in group.iter().enumerate() {
        let Some(sc) = t.scale else {
            return Err(SequentialError::Quantize(ApplyError::Method {
                file: std::path::PathBuf::new(),
                tensor: t.tensor.clone(),
                method: method.name(),
                source: MethodError::NoTensorScale,
            }));
        };
        match by_scale
            .iter_mut()
            .find(|(s, _)| s.to_bits() == sc.to_bits())
        {
            Some((_, v)) => v.push(i),
            None => by_scale.push((sc, vec![i])),
        }
    }
    let mut out = Vec::with_capacity(group.len());
    for (stored, idx) in by_scale {
        let mut ws = Vec::with_capacity(idx.len());
        let mut first = None;
        for &i in &idx {
            let (_, target, s) = group[i];
            let t = ck.tensor(&target.tensor)?;
            first.get_or_insert_with(|| (t.file.to_path_buf(), t.name.to_string()));
            let (n, k) = (t.shape[0], t.shape[1]);
            let w = source_weight(&t, s, method, gptq, asymmetric)?;
            ck.release(&target.tensor);
            ws.push((w, n, k));
        }
        let members: Vec<ScaleMember<'_>> = idx
            .iter()
            .zip(&ws)
            .map(|(&i, (w, n, k))| {
                let d = Some(group[i].2.second_moment.as_slice()).filter(|d| d.len() == *k);
                (w.as_slice(), *n, *k, d)
            })
            .collect();
        let (file, tensor) = first.unwrap_or_default();
        let merr = |source| ApplyError::Method {
            file: file.clone(),
            tensor: tensor.clone(),
            method: method.name(),
            source,
        };
        let (chosen, mats) = search_global_scale(&members, layout, stored).map_err(merr)?;
        let mats = match factor {
            Some(f) => {
                let gs = kernel_global_scale(layout, Some(chosen));
                ws.iter()
                    .map(|(w, n, k)| quantize_gptq_factored(w, *n, *k, gs, f, gptq))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(merr)?
            }
            None => mats,
        };
        for (&i, m) in idx.iter().zip(mats) {
            m.validate().map_err(|e| merr(MethodError::Fp4(e)))?;
            out.push((group[i].0.clone(), m, Some(chosen)));
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
/// Sequential calibration with `method` (mse or gptq) in the loop: returns the run's summary and
/// the quantized weight of every decoder-layer Linear the plan quantizes (with the tensor scales
/// the NVFP4 `mse` search chose).
pub fn quantize_sequential(
    ck: &Checkpoint,
    plan: &Plan,
    model: &mut dyn LayerWalk,
    data: &CalibData,
    method: Method,
    gptq: &GptqOptions,
    stats: CollectOptions,
    asymmetric: Option<f64>,
    within_layer: bool,
    progress: &dyn Fn(usize, usize),
) -> Result<(SequentialRun, Precomputed), SequentialError> {
    let layout = plan.layout;
    let targets = targets(ck, plan)?;
    let mut done: BTreeMap<String, Fp4Matrix> = BTreeMap::new();
    let mut scales: BTreeMap<String, f32> = BTreeMap::new();
    let opts = CollectOptions {
        // The asymmetric target needs H for every method.
        hessian: method == Method::Gptq || asymmetric.is_some(),
        ..stats
    };
    let mut per_layer = |_l: usize,
                         stats: &BTreeMap<String, Arc<LinearStats>>|
     -> Result<Vec<(String, Weight)>, SequentialError> {
        // Modules grouped by the statistics they share (q/k/v; an expert's gate and up), in
        // module order: GPTQ factors each group's Hessian once, and a group's factor lives only
        // while its modules are quantized (memory: one factor per thread).
        let mut groups: Vec<Vec<(&String, &Target, &Arc<LinearStats>)>> = Vec::new();
        let mut group_of: BTreeMap<*const LinearStats, usize> = BTreeMap::new();
        for (m, s) in stats {
            if let Some(t) = targets.get(m) {
                let g = *group_of.entry(Arc::as_ptr(s)).or_insert_with(|| {
                    groups.push(Vec::new());
                    groups.len() - 1
                });
                groups[g].push((m, t, s));
            }
        }
        let results: Vec<(String, Fp4Matrix, Option<f32>)> = groups
            .par_iter()
            .map(
                |group| -> Result<Vec<(String, Fp4Matrix, Option<f32>)>, SequentialError> {
                    // A factorization that fails is left to each module's own call, which reports
                    // the error with its file and tensor.
                    let factor = match (method, group[0].2.hessian.as_deref()) {
                        (Method::Gptq, Some(h)) => {
                            let k = group[0].2.second_moment.len();
                            gptq_factor(h, k, layout.format(), gptq).ok()
                        }
                        _ => None,
                    };
                    let searchable = method == Method::Mse || factor.is_some();
                    if gptq.mse_scale_search && layout.format() == Fp4Format::Nvfp4 && searchable {
                        return searched_group(
                            ck,
                            group,
                            layout,
                            method,
                            factor.as_ref(),
                            gptq,
                            asymmetric,
                        );
                    }
                    group
                        .iter()
                        .map(|(module, target, s)| {
                            quantize_target(
                                ck,
                                module,
                                target,
                                s,
                                factor.as_ref(),
                                layout,
                                method,
                                gptq,
                                asymmetric,
                            )
                            .map(|(m, q)| (m, q, None))
                        })
                        .collect()
                },
            )
            .collect::<Result<Vec<_>, SequentialError>>()?
            .into_iter()
            .flatten()
            .collect();
        let mut new = Vec::with_capacity(results.len());
        for (module, m, scale) in results {
            new.push((module.clone(), Weight::Fp4(m.clone())));
            if let Some(sc) = scale {
                scales.insert(module.clone(), sc);
            }
            done.insert(module, m);
        }
        Ok(new)
    };
    // The lm_head too where the plan quantizes it (`--quantize-lm-head`).
    let head = targets.contains_key(&Names::new(model.config().arch).lm_head());
    let run = run_sequential_with(
        model,
        data,
        opts,
        SequentialModes {
            asymmetric: asymmetric.is_some(),
            within_layer,
            head,
        },
        Some(&mut per_layer),
        progress,
    )?;
    Ok((
        run,
        Precomputed {
            weights: done,
            scales,
        },
    ))
}
