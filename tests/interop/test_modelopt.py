"""ModelOpt NVFP4 layout (`--layout modelopt`): names, dtypes, shapes and scale conventions
against what vLLM's ModelOpt loader reads, and dequantization by that convention.

vLLM source read (vllm-project/vllm, commit 00155cdecca722d98e34234c3d172725b7720b7d,
vllm/model_executor/layers/quantization/modelopt.py); the lines relied on, quoted:
- QUANT_ALGOS = [..., "NVFP4", "W4A16_NVFP4", ...]; `ModelOptQuantConfigBase.from_config`
  reads hf_quant_config.json `quantization.{quant_algo, kv_cache_quant_algo, group_size,
  exclude_modules}`; `ModelOptNvFp4Config._from_config`: `required_fields = ["group_size",
  "kv_cache_quant_algo", "exclude_modules"]` (missing -> ValueError); `quant_method ==
  "W4A16_NVFP4"` -> `self.LinearMethodCls = ModelOptNvFp4W4A16LinearMethod`;
  `override_quantization_method`: config.json `quant_method` starting with "modelopt" and
  "FP4" in quant_algo -> "modelopt_fp4".
- `ModelOptNvFp4W4A16LinearMethod.create_weights`: `weight` uint8 [out, in // 2];
  `weight_scale_2` float32 PerTensorScaleParameter "per-tensor global weight scale = amax /
  (6.0 * 448.0)", one entry per fused partition; `weight_scale` float8_e4m3fn [out, in //
  group_size]; `input_scale` only a placeholder ("For native W4A16 checkpoints (no input_scale
  on disk) the param stays uninitialized and is simply deleted"); `if input_size_per_partition
  % 16 != 0: raise ValueError`.
- `process_weights_after_loading`: "Rename weight_scale_2 -> weight_global_scale. NO
  reciprocation: ModelOpt already stores amax/2688, which is exactly what Marlin consumes";
  `layer.weight_scale_2.max()` over fused partitions, with the warning "the global weight scale
  (weight_scale_2) differs across fused parallel layers (e.g. q/k/v_proj)". So the convention is
  w = fp4 * float(weight_scale) * weight_scale_2, one weight_scale_2 per fused set.
- `ModelOptQuantConfigBase.is_layer_excluded`: exact names (is_layer_skipped), substrings, and
  fnmatch wildcards of `exclude_modules`.
compressed-tensors' own ModelOpt reader (entrypoints/convert/converters/modelopt_nvfp4.py,
ModelOptNvfp4Converter: weight -> weight_packed, 1 / weight_scale_2 -> weight_global_scale) is
run on our tensors too, and its result decompressed by NVFP4PackedCompressor.
"""
import json
import re
from fnmatch import fnmatch

import torch
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import ModelOptNvfp4Converter
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.quant_scheme import NVFP4

from interop_common import MODELOPT, SOURCE, bit_diff, bits, config, load_all, modules_with, ours

QUANT_ALGOS_NVFP4 = {"NVFP4", "W4A16_NVFP4"}  # the NVFP4 entries of vLLM's QUANT_ALGOS
FUSED = [(re.compile(r"^(.*\.self_attn)\.(q_proj|k_proj|v_proj)$"), ("q_proj", "k_proj", "v_proj")),
         (re.compile(r"^(.*)\.(gate_proj|up_proj)$"), ("gate_proj", "up_proj"))]


def hf_quant_config():
    with open(MODELOPT / "hf_quant_config.json") as f:
        return json.load(f)


def excluded(prefix, exclude):
    """vLLM's is_layer_excluded, minus the fused-name mapping (our names are unfused)."""
    return any(prefix == e or (e != prefix and e in prefix) or fnmatch(prefix, e) for e in exclude)


def test_modelopt_config_as_vllm_reads_it(metrics):
    q = hf_quant_config()["quantization"]
    missing = [f for f in ("group_size", "kv_cache_quant_algo", "exclude_modules") if f not in q]
    qc = config(MODELOPT).get("quantization_config", {})
    metrics.update(quant_algo=q.get("quant_algo"), group_size=q.get("group_size"), missing=missing,
                   config_json_quant_method=qc.get("quant_method"))
    assert not missing, f"vLLM raises: NVFP4 quantization requires {missing} in hf_quant_config.json"
    assert str(q["quant_algo"]).upper() in QUANT_ALGOS_NVFP4
    assert isinstance(q["group_size"], int) and q["group_size"] == 16
    assert isinstance(q["exclude_modules"], list)
    assert q["kv_cache_quant_algo"] is None or isinstance(q["kv_cache_quant_algo"], str)
    # config.json form (vLLM picks modelopt_fp4 from it too)
    assert str(qc.get("quant_method", "")).lower().startswith("modelopt")
    assert "FP4" in str(qc.get("quant_algo", "")).upper()


def test_modelopt_tensors_as_vllm_creates_them(metrics):
    t = load_all(MODELOPT)
    q = hf_quant_config()["quantization"]
    gs, w4a16 = q["group_size"], str(q["quant_algo"]).upper() == "W4A16_NVFP4"
    mods = modules_with(t, ".weight_scale_2")
    problems = []
    for m in mods:
        w, s, s2 = t[f"{m}.weight"], t[f"{m}.weight_scale"], t[f"{m}.weight_scale_2"]
        n, k = w.shape[0], 2 * w.shape[1]
        if w.dtype != torch.uint8 or w.dim() != 2:
            problems.append(f"{m}.weight: {w.dtype} {tuple(w.shape)}, vLLM creates uint8 [out, in // 2]")
        if s.dtype != torch.float8_e4m3fn or tuple(s.shape) != (n, k // gs):
            problems.append(f"{m}.weight_scale: {s.dtype} {tuple(s.shape)}, vLLM creates float8_e4m3fn {(n, k // gs)}")
        if s2.dtype != torch.float32 or s2.numel() != 1:
            problems.append(f"{m}.weight_scale_2: {s2.dtype} {tuple(s2.shape)}, vLLM loads one float32")
        if k % 16:
            problems.append(f"{m}: in features {k} not a multiple of 16 (vLLM raises)")
        if not (torch.isfinite(s2).all() and (s2 > 0).all()):
            problems.append(f"{m}.weight_scale_2 = {s2.item()}")
        if not w4a16 and f"{m}.input_scale" not in t:
            problems.append(f"{m}.input_scale missing: quant_algo NVFP4 (W4A4) needs it")
    # Fused sets must share weight_scale_2 (vLLM takes the max over the set).
    unequal = []
    for m in mods:
        for rx, names in FUSED:
            mt = rx.match(m)
            if mt:
                vals = {x: t[f"{mt.group(1)}.{x}.weight_scale_2"].item() for x in names
                        if f"{mt.group(1)}.{x}.weight_scale_2" in t}
                if len(set(vals.values())) > 1:
                    unequal.append(vals)
                break
    # Every dense Linear weight left in the checkpoint must be excluded in vLLM's eyes.
    dense_linears = [k[: -len(".weight")] for k, v in t.items() if k.endswith(".weight") and v.dim() == 2
                     and v.dtype != torch.uint8 and "embed_tokens" not in k]
    not_excluded = [m for m in dense_linears if not excluded(m, q["exclude_modules"])]
    # And no quantized module may be excluded.
    wrongly_excluded = [m for m in mods if excluded(m, q["exclude_modules"])]
    metrics.update(modules=len(mods), problems=problems[:5], fused_sets_unequal=len(unequal),
                   dense_linears=dense_linears, not_excluded=not_excluded, wrongly_excluded=wrongly_excluded[:5])
    assert mods and not problems and not unequal and not not_excluded and not wrongly_excluded


def test_modelopt_dequantized_by_vllm_convention(metrics):
    """w = fp4 * float(weight_scale) * weight_scale_2 (f32: fp4 * scale is exact, so this is the
    correctly rounded value of the convention) against (a) our dequantization (dequant-dump),
    (b) compressed-tensors' ModelOpt converter + NVFP4 decompress, (c) the BF16 source (FP4 error
    bound). Our reader turns weight_scale_2 into a compressed-tensors global scale 1 / s2, exactly
    as compressed-tensors' converter does, so (a) must equal (b) bit for bit, and both may differ
    from the convention by rounding only (counted, bounded to 2 ulp)."""
    t = load_all(MODELOPT)
    mine = load_all(ours("modelopt-nvfp4"))
    src = load_all(SOURCE)
    q = hf_quant_config()["quantization"]
    ct = ModelOptNvfp4Converter(ignore=q["exclude_modules"], targets=["re:.*"]).validate(dict(t))
    scheme = QuantizationScheme(targets=["Linear"], **NVFP4)
    mods = modules_with(t, ".weight_scale_2")
    ours_vs_ct, ulps, n_diff, n_elems = [], 0, 0, 0
    worst_rel, min_sqnr = 0.0, float("inf")
    for m in mods:
        packed, scale, s2 = t[f"{m}.weight"], t[f"{m}.weight_scale"], t[f"{m}.weight_scale_2"]
        n, k2 = packed.shape
        codes = unpack_fp4_from_uint8(packed, n, 2 * k2, dtype=torch.float32)
        conv = (codes.reshape(n, -1, 16) * scale.to(torch.float32).unsqueeze(-1)).reshape(n, -1) * s2.float()
        o = mine[f"{m}.weight"]
        # (b) compressed-tensors' reading of the same file
        sd = {x: ct[f"{m}.{x}"] for x in ("weight_packed", "weight_scale", "weight_global_scale")}
        ctw = torch.ops.aten.mul(unpack_fp4_from_uint8(sd["weight_packed"], n, 2 * k2, dtype=torch.float32),
                                 (sd["weight_scale"].to(torch.float32) / sd["weight_global_scale"]).repeat_interleave(16, dim=1))
        d = bit_diff(f"{m}.weight (ours vs compressed-tensors ModelOpt reader)", ctw, o)
        if d:
            ours_vs_ct.append(d)
        # (a) against the vLLM convention: rounding-level differences only
        u = (bits(conv).long() - bits(o).long()).abs()
        u = u[(conv != 0) | (o != 0)]
        ulps = max(ulps, int(u.max()) if u.numel() else 0)
        n_diff += int((u > 0).sum())
        n_elems += conv.numel()
        # (c) FP4 error against the source
        x = src[f"{m}.weight"].float()
        sqnr = 10 * torch.log10((x ** 2).sum() / ((x - conv) ** 2).sum()).item()
        min_sqnr = min(min_sqnr, sqnr)
    # One module through NVFP4PackedCompressor.decompress too (bf16 path). The converter keeps
    # weight_scale_2's 0-d shape for weight_global_scale; with a 0-d global scale, decompress's
    # `scale / global_scale` is computed in bfloat16 (a 0-d tensor does not promote a bf16
    # tensor), unlike the [1]-shaped global scale of compressed-tensors' own layout. So the
    # exact check uses shape [1]; the 0-d result is recorded (finding T3, a compressed-tensors
    # quirk that real ModelOpt checkpoints, which store 0-d weight_scale_2 too, share).
    m0 = mods[0]
    sd0 = {x: ct[f"{m0}.{x}"] for x in ("weight_packed", "weight_scale", "weight_global_scale")}
    ref0 = mine[f"{m0}.weight"]
    dec_0d = NVFP4PackedCompressor.decompress(dict(sd0), scheme)["weight"]
    sd0["weight_global_scale"] = sd0["weight_global_scale"].reshape([1])
    dec = NVFP4PackedCompressor.decompress(sd0, scheme)["weight"]
    d0 = bit_diff(f"{m0}.weight (NVFP4PackedCompressor.decompress, bf16)", dec, ref0.to(dec.dtype))
    d0_0d = bit_diff(f"{m0}.weight (decompress with the converter's 0-d global scale)", dec_0d, ref0.to(dec_0d.dtype))
    metrics.update(modules=len(mods), elements=n_elems, ours_vs_ct_reader_mismatching=len(ours_vs_ct),
                   vs_vllm_convention_elements_differing=n_diff, vs_vllm_convention_max_ulp=ulps,
                   min_sqnr_db_vs_source=round(min_sqnr, 2), decompress_first_module=d0,
                   t3_decompress_with_0d_global_scale=d0_0d)
    assert not ours_vs_ct, ours_vs_ct[:3]
    assert d0 is None
    assert ulps <= 2, f"our dequantization departs from vLLM's convention by {ulps} ulp"
    assert min_sqnr > 15.0, f"FP4 error too large against the source: {min_sqnr:.2f} dB"
