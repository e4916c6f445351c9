"""MXFP4: our compressed-tensors `mxfp4-pack-quantized` output against compressed-tensors'
own code, and our bytes against transformers' gpt-oss MXFP4 dequantization.

Our converter writes MXFP4 only in the compressed-tensors layout (`--format mxfp4`); it has no
gpt-oss writer (`<name>_blocks` U8 [E, N, K/32, 16], `<name>_scales` U8 [E, N, K/32], fused 3-D
experts, `quant_method: mxfp4`). So:
1. decompress: MXFP4PackedCompressor (compressors/mxfp4/base.py) vs OUR dequantization
   (dequant-dump), bit for bit, as for NVFP4 (bf16 decompress output; f32 `dequantize`).
2. RTN: the BF16 source through compressed-tensors' MX scale generation (calculate_qparams ->
   generate_mx_scales) and MXFP4PackedCompressor.compress vs our packed codes and E8M0 bytes.
3. gpt-oss convention (weaker, labelled): our [N, K/2] packed bytes viewed as [1, N, K/32, 16]
   blocks and our [N, K/32] scale bytes as [1, N, K/32] go through transformers'
   integrations/mxfp4.py `convert_moe_packed_tensors` (lut[nibble], low nibble first, ldexp by
   scale - 127) and must equal our dequantization bit for bit: the bytes ARE the gpt-oss
   encoding, so a gpt-oss writer would only rename and stack them (no gpt-oss checkpoint is
   written or loaded here).
"""
import torch
from compressed_tensors.compressors.mx_utils import decompress_mx_scale
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.quantization.lifecycle.forward import dequantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from interop_common import CT_MXFP4, SOURCE, bit_diff, load_all, modules_with, ours
from test_ct_nvfp4 import ct_scheme_and_compressor


def test_mxfp4_config_parses_with_compressed_tensors(metrics):
    qc, scheme, comp = ct_scheme_and_compressor(CT_MXFP4)
    metrics.update(format=str(qc.format), compressor=comp.__name__)
    assert comp.__name__ == "MXFP4PackedCompressor"
    assert scheme.weights.group_size == 32 and str(scheme.weights.scale_dtype) == "torch.uint8"


def test_mxfp4_decompress_bit_exact(metrics):
    _, scheme, comp = ct_scheme_and_compressor(CT_MXFP4)
    t = load_all(CT_MXFP4)
    mine = load_all(ours("ct-mxfp4"))
    mods = modules_with(t, ".weight_packed")
    assert mods and sorted(k[: -len(".weight")] for k in mine) == mods
    diffs = []
    for m in mods:
        sd = {s: t[f"{m}.{s}"] for s in ("weight_packed", "weight_scale")}
        ours_f32 = mine[f"{m}.weight"]
        ct_bf16 = comp.decompress(dict(sd), scheme)["weight"]
        d = bit_diff(f"{m}.weight (decompress, bf16)", ct_bf16, ours_f32.to(ct_bf16.dtype))
        if d:
            diffs.append(d)
        n, k2 = sd["weight_packed"].shape
        codes = unpack_fp4_from_uint8(sd["weight_packed"], n, 2 * k2, dtype=torch.float32)
        scale = decompress_mx_scale(sd["weight_scale"]).to(torch.float32)
        ct_f32 = dequantize(x_q=codes, scale=scale, args=scheme.weights, dtype=torch.float32)
        d = bit_diff(f"{m}.weight (dequantize, f32)", ct_f32, ours_f32)
        if d:
            diffs.append(d)
    metrics.update(modules=len(mods), mismatching=len(diffs), first=diffs[:3])
    assert not diffs, f"{len(diffs)} tensor(s) differ; first: {diffs[:3]}"


def test_mxfp4_rtn_matches_compressed_tensors(metrics):
    _, scheme, comp = ct_scheme_and_compressor(CT_MXFP4)
    t = load_all(CT_MXFP4)
    src = load_all(SOURCE)
    mods = modules_with(t, ".weight_packed")
    # MXFP4 has no per-tensor scale, so quantization is per 32-element group of a row: modules
    # with the same K are stacked and go through compressed-tensors in one call (same result,
    # a fraction of the per-call overhead), then split back per module.
    by_k = {}
    for m in mods:
        by_k.setdefault(src[f"{m}.weight"].shape[1], []).append(m)
    counts = {"weight_scale": 0, "weight_packed": 0}
    first = []
    for k, group in by_k.items():
        w = torch.cat([src[f"{m}.weight"] for m in group], 0)
        g = w.reshape(w.shape[0], k // 32, 32)
        scale, _ = calculate_qparams(g.amin(-1), g.amax(-1), scheme.weights)
        ref = comp.compress({"weight": w, "weight_scale": scale}, scheme)
        row = 0
        for m in group:
            n = src[f"{m}.weight"].shape[0]
            for name in counts:
                d = bit_diff(f"{m}.{name}", ref[name][row:row + n], t[f"{m}.{name}"])
                if d:
                    counts[name] += d["differing"]
                    first.append(d)
            row += n
    metrics.update(modules=len(mods), bytes_differing=counts, first=first[:3])
    assert not first, f"bytes differing: {counts}; first: {first[:3]}"


def test_mxfp4_bytes_follow_transformers_gpt_oss_convention(metrics):
    t = load_all(CT_MXFP4)
    mine = load_all(ours("ct-mxfp4"))
    mods = modules_with(t, ".weight_packed")
    diffs = []
    for m in mods:
        packed, scales = t[f"{m}.weight_packed"], t[f"{m}.weight_scale"]
        n, k2 = packed.shape
        blocks = packed.reshape(1, n, k2 // 16, 16)
        w = convert_moe_packed_tensors(blocks, scales.reshape(1, n, k2 // 16), dtype=torch.float32)
        w = w[0].transpose(0, 1).contiguous()  # gpt-oss returns [E, K, N]
        d = bit_diff(f"{m}.weight (gpt-oss convert_moe_packed_tensors, f32)", w, mine[f"{m}.weight"])
        if d:
            diffs.append(d)
    metrics.update(modules=len(mods), mismatching=len(diffs), first=diffs[:3],
                   note="reshape-only check: our converter writes no gpt-oss checkpoint")
    assert not diffs, f"{len(diffs)} tensor(s) differ; first: {diffs[:3]}"
