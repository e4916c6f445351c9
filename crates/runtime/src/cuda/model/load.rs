//! Loading a checkpoint onto the GPU: the configuration checked, the memory needed estimated
//! and refused before any upload when it does not fit, then every layer's weights uploaded
//! (q/k/v and gate/up fused where they can share one matrix, experts stacked).

use std::path::Path;
use std::sync::Arc;

use cudarc::driver::CudaSlice;
use half::bf16;
use mimo_kernels::cuda::{GpuFp4Weight, MoeWeights};
use mimo_kernels::Fp4Matrix;

use super::{check_config, Experts, Ffn, GateUp, GpuModel, Layer, Mlp, Moe, Qkv};
use crate::arch::Names;
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::cuda::error::GpuError;
use crate::cuda::estimate;
use crate::cuda::weights::{linear_to_bf16, Gpu, GpuLinear};
use crate::linear::{Linear, Weight};
use crate::weights::Loader;

impl GpuModel {
    /// Loads a checkpoint folder onto the GPU.
    pub fn load(gpu: Arc<Gpu>, dir: &Path) -> Result<GpuModel, GpuError> {
        let ck = Checkpoint::open(dir).map_err(crate::weights::LoadError::from)?;
        GpuModel::from_checkpoint(gpu, &ck)
    }

    /// Loads an opened checkpoint onto the GPU, refusing before any upload if the weights and
    /// the prefill scratch do not fit in the free device memory.
    pub fn from_checkpoint(gpu: Arc<Gpu>, ck: &Checkpoint) -> Result<GpuModel, GpuError> {
        let c = ModelConfig::from_json(ck.config(), &ck.root().join("config.json"))?;
        check_config(&c)?;
        let names = Names::new(c.arch);
        let ld = Loader::new(ck)?;
        let need = estimate::model_bytes(&gpu, &c, &estimate::stored_formats(&c, &names, &ld));
        estimate::check_fits(&gpu, &format!("{}", ck.root().display()), need)?;
        let (hd, d) = (c.hidden_size, c.head_dim);
        let embed_l = ld.linear(&names.embed(), c.vocab_size, hd, false)?;
        let embed = gpu.upload(&linear_to_bf16(&embed_l), "upload embedding")?;
        drop(embed_l);
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            let l = ld.linear(&names.lm_head(), c.vocab_size, hd, false)?;
            Some(GpuLinear::upload(&gpu, "lm_head", &l)?)
        };
        let final_norm = gpu.upload(&ld.vector(&names.final_norm(), hd)?, "upload norm")?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let att = |p: &str| names.attn(l, p);
            let (qn, kvn) = (c.num_heads * d, c.num_kv_heads * d);
            let q = ld.linear(&att("q_proj"), qn, hd, c.qkv_bias)?;
            let k = ld.linear(&att("k_proj"), kvn, hd, c.qkv_bias)?;
            let v = ld.linear(&att("v_proj"), kvn, hd, c.qkv_bias)?;
            let o = ld.linear(&att("o_proj"), hd, qn, c.o_bias)?;
            // One matrix where the three share a format; else k and v in one where they do
            // (a mixed checkpoint's k/v kept dense beside an FP4 q), else three.
            let qkv = match GpuLinear::fuse(&gpu, &att("qkv"), &[&q, &k, &v], false)? {
                Some(f) => Qkv::Fused(f),
                None => match GpuLinear::fuse(&gpu, &att("kv"), &[&k, &v], false)? {
                    Some(kv) => Qkv::QKv(single(&gpu, &att("q_proj"), &q, false)?, kv),
                    None => Qkv::Split(
                        single(&gpu, &att("q_proj"), &q, false)?,
                        single(&gpu, &att("k_proj"), &k, false)?,
                        single(&gpu, &att("v_proj"), &v, false)?,
                    ),
                },
            };
            let up_bias = |lin: &Linear| -> Result<Option<CudaSlice<f32>>, GpuError> {
                lin.bias
                    .as_ref()
                    .map(|b| gpu.upload(b, "upload bias"))
                    .transpose()
            };
            let biases = [up_bias(&q)?, up_bias(&k)?, up_bias(&v)?];
            let (q_norm, k_norm) = if c.qk_norm {
                (
                    Some(gpu.upload(
                        &ld.vector(&format!("{}.weight", att("q_norm")), d)?,
                        "upload q_norm",
                    )?),
                    Some(gpu.upload(
                        &ld.vector(&format!("{}.weight", att("k_norm")), d)?,
                        "upload k_norm",
                    )?),
                )
            } else {
                (None, None)
            };
            let ffn = if c.moe_layers[l] {
                let mc = c.moe.clone().ok_or_else(|| {
                    GpuError::Unsupported(format!("layer {l}: MoE layer without MoE parameters"))
                })?;
                let ei = mc.expert_intermediate_size;
                let mut experts = Vec::with_capacity(mc.num_experts);
                for e in 0..mc.num_experts {
                    let [g, u, dn] = names.expert(l, e);
                    experts.push([
                        ld.linear(&g, ei, hd, false)?,
                        ld.linear(&u, ei, hd, false)?,
                        ld.linear(&dn, hd, ei, false)?,
                    ]);
                }
                let experts = upload_experts(&gpu, &format!("layer {l} experts"), &experts)?;
                let shared = match mc.shared_expert_intermediate_size {
                    Some(si) => {
                        let [g, u, dn] = names.shared_expert(l);
                        let (g, u, dn) = (
                            ld.linear(&g, si, hd, false)?,
                            ld.linear(&u, si, hd, false)?,
                            ld.linear(&dn, hd, si, false)?,
                        );
                        let gate = ld.linear(&names.shared_expert_gate(l), 1, hd, false)?;
                        Some((
                            mlp(&gpu, &format!("layer {l} shared expert"), &g, &u, &dn, si)?,
                            GpuLinear::Bf16 {
                                w: gpu.upload(&linear_to_bf16(&gate), "upload shared gate")?,
                                n: 1,
                                k: hd,
                                bias: None,
                            },
                        ))
                    }
                    None => None,
                };
                let router = ld.linear(&names.router(l), mc.num_experts, hd, false)?;
                Ffn::Moe(Moe {
                    router: gpu.upload(&linear_to_bf16(&router), "upload router")?,
                    experts,
                    shared,
                    n_experts: mc.num_experts,
                    top_k: mc.top_k,
                    renorm: mc.norm_topk_prob,
                    inter: ei,
                })
            } else {
                let [g, u, dn] = names.mlp(l);
                let i = c.intermediate_size;
                let (g, u, dn) = (
                    ld.linear(&g, i, hd, c.mlp_bias)?,
                    ld.linear(&u, i, hd, c.mlp_bias)?,
                    ld.linear(&dn, hd, i, c.mlp_bias)?,
                );
                Ffn::Dense(mlp(&gpu, &format!("layer {l} mlp"), &g, &u, &dn, i)?)
            };
            layers.push(Layer {
                in_norm: gpu.upload(&ld.vector(&names.input_norm(l), hd)?, "upload norm")?,
                post_norm: gpu.upload(
                    &ld.vector(&names.post_attention_norm(l), hd)?,
                    "upload norm",
                )?,
                qkv,
                biases,
                q_norm,
                k_norm,
                o: GpuLinear::upload(&gpu, &att("o_proj"), &o)?,
                window: c.sliding_window[l].unwrap_or(0),
                ffn,
            });
        }
        GpuModel::assemble(c, gpu, embed, lm_head, final_norm, layers)
    }
}

/// One Linear uploaded alone (biases optional).
fn single(gpu: &Gpu, name: &str, l: &Linear, with_bias: bool) -> Result<GpuLinear, GpuError> {
    GpuLinear::fuse(gpu, name, &[l], with_bias)?
        .ok_or_else(|| GpuError::Unsupported(format!("{name}: cannot upload")))
}

fn mlp(
    gpu: &Gpu,
    name: &str,
    g: &Linear,
    u: &Linear,
    d: &Linear,
    inter: usize,
) -> Result<Mlp, GpuError> {
    let gate_up = match GpuLinear::fuse(gpu, name, &[g, u], true)? {
        Some(f) => GateUp::Fused(f),
        None => GateUp::Split(single(gpu, name, g, true)?, single(gpu, name, u, true)?),
    };
    Ok(Mlp {
        gate_up,
        down: single(gpu, name, d, true)?,
        inter,
    })
}

/// Stacks the experts of one layer: FP4 where every expert's gate and up share a format and a
/// global scale (so that one matrix holds both), BF16 otherwise (FP4 dequantized).
fn upload_experts(gpu: &Gpu, name: &str, experts: &[[Linear; 3]]) -> Result<Experts, GpuError> {
    let fp4: Option<Vec<(Fp4Matrix, &Fp4Matrix)>> = experts
        .iter()
        .map(|[g, u, d]| match (&g.weight, &u.weight, &d.weight) {
            (Weight::Fp4(g), Weight::Fp4(u), Weight::Fp4(d))
                if g.format == u.format && g.global_scale == u.global_scale =>
            {
                Some((
                    Fp4Matrix {
                        format: g.format,
                        n: g.n + u.n,
                        k: g.k,
                        packed: [g.packed.as_slice(), u.packed.as_slice()].concat(),
                        scales: [g.scales.as_slice(), u.scales.as_slice()].concat(),
                        global_scale: g.global_scale,
                    },
                    d,
                ))
            }
            _ => None,
        })
        .collect();
    if let Some(v) = fp4 {
        let gu: Vec<Fp4Matrix> = v.iter().map(|p| p.0.clone()).collect();
        let dn: Vec<Fp4Matrix> = v.iter().map(|p| p.1.clone()).collect();
        let w = MoeWeights {
            gate_up: GpuFp4Weight::upload_experts(&gpu.ctx, &format!("{name} gate_up"), &gu)?,
            down: GpuFp4Weight::upload_experts(&gpu.ctx, &format!("{name} down"), &dn)?,
        };
        w.dims()?;
        return Ok(Experts::Fp4(w));
    }
    let mut gu: Vec<bf16> = Vec::new();
    let mut dn: Vec<bf16> = Vec::new();
    for [g, u, d] in experts {
        gu.extend(linear_to_bf16(g));
        gu.extend(linear_to_bf16(u));
        dn.extend(linear_to_bf16(d));
    }
    Ok(Experts::Bf16 {
        gate_up: gpu.upload(&gu, "upload experts")?,
        down: gpu.upload(&dn, "upload experts")?,
    })
}
