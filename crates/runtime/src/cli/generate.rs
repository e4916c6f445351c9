//! `mimo-run generate`: streaming generation on either backend.

use std::io::Write;

use anyhow::{bail, Result};
use serde_json::json;

use super::gpu;
use super::{load_model, load_tokenizer, GenerateArgs};
use crate::generate::{generate, GenerationStats};
use crate::tokenizer::Message;

pub(super) fn run_generate(
    backend: &gpu::Backend,
    args: &GenerateArgs,
    json_out: bool,
) -> Result<()> {
    let (dir, prompt, chat) = (args.model.as_path(), args.prompt.as_str(), args.chat);
    let (max_tokens, ctx, params) = (args.max_tokens, args.ctx, args.sampling());
    let tok = load_tokenizer(dir)?;
    // Loaded only on the CPU path; the GPU path reads the checkpoint straight to the device.
    let (cpu_model, mut gpu_model) = match backend {
        gpu::Backend::Cpu => (Some(load_model(dir)?), None),
        gpu::Backend::Cuda(g) => (None, Some(gpu::load_model(g, dir)?)),
    };
    let config = match (&cpu_model, &gpu_model) {
        (Some(m), _) => &m.config,
        (_, Some(m)) => &m.config,
        _ => bail!("no model loaded"),
    }
    .clone();
    let ids = if chat {
        let mut msgs = Vec::new();
        if let Some(s) = &args.system {
            msgs.push(Message {
                role: "system".into(),
                content: s.clone(),
            });
        }
        msgs.push(Message {
            role: "user".into(),
            content: prompt.to_string(),
        });
        let text = tok.apply_chat_template(&msgs)?;
        // The template already holds any BOS token.
        tok.encode(&text, false)?
    } else {
        tok.encode(prompt, true)?
    };
    let mut eos = tok.end_ids(&config.eos_token_ids);
    if chat {
        // Chat models end a turn with these even when eos_token says otherwise.
        for t in ["<|im_end|>", "<|eot_id|>", "<|end|>"] {
            eos.extend(tok.token_to_id(t));
        }
    }
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = String::new();
    let on_token = |t: u32| {
        generated.push(t);
        if json_out {
            return;
        }
        // Decode the whole continuation and print what is new; hold back a trailing partial
        // UTF-8 sequence (shown as U+FFFD) until the next token completes it.
        if let Ok(text) = tok.decode(&generated) {
            if !text.ends_with('\u{FFFD}')
                && text.len() > printed.len()
                && text.starts_with(&printed)
            {
                crate::out!("{}", &text[printed.len()..]);
                printed = text;
            }
        }
    };
    let (out, stats): (Vec<u32>, GenerationStats) = match (&cpu_model, &mut gpu_model) {
        (Some(m), _) => generate(m, &ids, max_tokens, ctx, params, &eos, on_token)?,
        (_, Some(m)) => crate::cuda::generate(m, &ids, max_tokens, ctx, params, &eos, on_token)?,
        _ => bail!("no model loaded"),
    };
    let text = tok.decode(&out)?;
    if json_out {
        let v = json!({"prompt_tokens": ids.len(), "tokens": out, "text": text, "stats": stats});
        crate::outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        if text.len() > printed.len() && text.starts_with(&printed) {
            crate::out!("{}", &text[printed.len()..]);
        }
        crate::outln!();
        // Stats go to stderr; flush the text first so the two never interleave.
        let _ = std::io::stdout().flush();
        eprintln!(
            "[{} prompt tokens: {:.1} tok/s prefill | {} generated: {:.2} tok/s decode{}]",
            stats.prompt_tokens,
            stats.prefill_tok_s,
            stats.generated_tokens,
            stats.decode_tok_s,
            if stats.stopped_at_eos {
                ", stopped at EOS"
            } else {
                ""
            }
        );
    }
    Ok(())
}
