//! `mimo-run ppl` and `mimo-run compare`: perplexity and candidate-vs-reference agreement.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use serde_json::json;

use super::gpu;
use super::{load_model, load_tokenizer, read_tokens, EvalText};
use crate::eval;

pub(super) fn run_ppl(
    backend: &gpu::Backend,
    dir: &Path,
    text: &EvalText,
    json_out: bool,
) -> Result<()> {
    let (file, ctx, stride) = (&text.file, text.ctx, text.stride);
    let tok = load_tokenizer(dir)?;
    let ids = read_tokens(&tok, file, text.max_tokens)?;
    let t0 = Instant::now();
    let p = match backend {
        gpu::Backend::Cpu => eval::perplexity(&load_model(dir)?, &ids, ctx, stride)?,
        gpu::Backend::Cuda(g) => {
            let mut m = gpu::load_model(g, dir)?;
            eval::perplexity_on(&mut m, &ids, ctx, stride)?
        }
    };
    let secs = t0.elapsed().as_secs_f64();
    if json_out {
        let v = json!({"model": dir, "file": file, "device": backend.name(), "prefill_gemm": backend.prefill_gemm(), "ctx": p.ctx, "stride": stride.min(p.ctx), "result": p, "seconds": secs});
        crate::outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        crate::outln!(
            "perplexity {:.4} (mean NLL {:.4} nats) over {} tokens, {} windows of {} (stride {}), {:.1}s",
            p.ppl,
            p.mean_nll,
            p.tokens,
            p.windows,
            p.ctx,
            stride.min(p.ctx),
            secs
        );
    }
    Ok(())
}

pub(super) fn run_compare(
    backend: &gpu::Backend,
    reference: &Path,
    candidate: &Path,
    text: &EvalText,
    worst: usize,
    json_out: bool,
) -> Result<()> {
    let (file, ctx, stride) = (&text.file, text.ctx, text.stride);
    let tok = load_tokenizer(reference)?;
    let ids = read_tokens(&tok, file, text.max_tokens)?;
    let cmp = match backend {
        gpu::Backend::Cpu => {
            let (r, c) = (load_model(reference)?, load_model(candidate)?);
            eval::compare(&r, &c, &ids, ctx, stride, worst)?
        }
        gpu::Backend::Cuda(g) => {
            // Both models resident (each refused before loading if it does not fit).
            let mut r = gpu::load_model(g, reference)?;
            let mut c = gpu::load_model(g, candidate)?;
            eval::compare_on(&mut r, &mut c, &ids, ctx, stride, worst)?
        }
    };
    if json_out {
        let v = json!({"reference": reference, "candidate": candidate, "file": file, "device": backend.name(), "prefill_gemm": backend.prefill_gemm(), "ctx": cmp.reference.ctx, "stride": stride.min(cmp.reference.ctx),
            "result": cmp});
        crate::outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    crate::outln!("tokens scored      {}", cmp.reference.tokens);
    crate::outln!("reference ppl      {:.4}", cmp.reference.ppl);
    crate::outln!(
        "candidate ppl      {:.4}  ({:+.2}%)",
        cmp.candidate.ppl,
        100.0 * (cmp.candidate.ppl / cmp.reference.ppl - 1.0)
    );
    crate::outln!("mean KL(ref||cand) {:.6} nats", cmp.mean_kl);
    crate::outln!(
        "mean entropy       reference {:.4}, candidate {:.4} nats ({:+.2}%)",
        cmp.reference_entropy,
        cmp.candidate_entropy,
        100.0 * (cmp.candidate_entropy / cmp.reference_entropy - 1.0)
    );
    crate::outln!("top-1 agreement    {:.2}%", 100.0 * cmp.top1_agreement);
    crate::outln!("  by the reference's margin between its first and second choice:");
    for b in &cmp.top1_by_margin {
        let range = match b.hi {
            Some(hi) => format!("[{:.1}, {:.1})", b.lo, hi),
            None => format!(">= {:.1}", b.lo),
        };
        let share = if b.positions > 0 {
            format!("{:.2}%", 100.0 * b.agree as f64 / b.positions as f64)
        } else {
            "-".to_string()
        };
        crate::outln!(
            "  margin {range:>11} nats: {:6} positions, agreement {share}",
            b.positions
        );
    }
    crate::outln!("worst positions:");
    for d in &cmp.worst {
        let show = |t: u32| tok.decode(&[t]).unwrap_or_default().replace('\n', "\\n");
        crate::outln!(
            "  pos {:6}  KL {:.4}  token {:?}  ref top-1 {:?}  cand top-1 {:?}",
            d.position,
            d.kl,
            show(d.token),
            show(d.reference_top1),
            show(d.candidate_top1)
        );
    }
    Ok(())
}
