#!/usr/bin/env python3
"""Train the byte-level BPE tokenizer on the training split and pre-tokenize both splits.

Needs: pip install tokenizers numpy. Run from the repository root after training/fetch_corpus.py:
    python3 training/tokenize_corpus.py

Writes:
  models/mimo-tiny-moe/tokenizer.json, tokenizer_config.json   (Qwen3-style special tokens)
  .corpus/train_ids.bin, .corpus/valid_ids.bin                  uint16 token ids, documents joined
                                                                by <|endoftext|> (git-ignored; carried
                                                                to the GPU machine for training)
  .corpus/tokenize_stats.json

The tokenizer follows Qwen2/Qwen3's layout: NFC normaliser, the Qwen regex split followed by
byte-level mapping, byte-level decoder; no BOS token is added, <|endoftext|> ends a document.
Only the training split is seen by the BPE trainer.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / ".corpus"
MODEL_DIR = REPO / "models" / "mimo-tiny-moe"
VALID = REPO / "calibration" / "heldout" / "valid.txt"

VOCAB_SIZE = 6144
DOC_SEP = "<|endoftext|>"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2/Qwen3 pre-tokenizer pattern (tokenizer.json of the Qwen3 releases).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                              use_regex=False)
    return tok


def documents(text: str) -> list[str]:
    return [d.strip("\n") for d in text.split(f"\n{DOC_SEP}\n")]


def encode_split(tok: Tokenizer, text: str, eos_id: int) -> np.ndarray:
    """Token ids of every document, each followed by <|endoftext|>."""
    ids: list[int] = []
    for enc in tok.encode_batch(documents(text), add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos_id)
    arr = np.asarray(ids, dtype=np.uint16)
    assert arr.max() < VOCAB_SIZE
    return arr


def main() -> None:
    train_text = (WORK / "train.txt").read_text(encoding="utf-8")
    valid_text = VALID.read_text(encoding="utf-8")
    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents(train_text), trainer=trainer, length=None)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise SystemExit(f"error: tokenizer has {tok.get_vocab_size()} entries, wanted {VOCAB_SIZE}")
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    tok.save(str(MODEL_DIR / "tokenizer.json"))

    eos_id = tok.token_to_id(DOC_SEP)
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
        for t in SPECIALS
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 1024,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (MODEL_DIR / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    train_ids = encode_split(tok, train_text, eos_id)
    valid_ids = encode_split(tok, valid_text, eos_id)
    train_ids.tofile(WORK / "train_ids.bin")
    valid_ids.tofile(WORK / "valid_ids.bin")
    stats = {
        "vocab_size": VOCAB_SIZE, "eos_id": eos_id,
        "train_tokens": int(train_ids.size), "valid_tokens": int(valid_ids.size),
        "train_bytes_per_token": len(train_text.encode()) / train_ids.size,
        "valid_bytes_per_token": len(valid_text.encode()) / valid_ids.size,
    }
    (WORK / "tokenize_stats.json").write_text(json.dumps(stats, indent=1))
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
