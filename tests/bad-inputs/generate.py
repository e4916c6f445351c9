#!/usr/bin/env python3
"""Writes the bad-input corpus under tests/bad-inputs/ (standard library only, deterministic).

Usage: tests/bad-inputs/generate.py [PATH-TO-mimo-quant]

Every case is a checkpoint folder `<group>/<case>/`; cases.json lists each folder with the tool
and subcommand to run on it and the substrings its error must contain. The FP4 cases are
tampered copies of `good/fp4`, which is `good/dense` converted by the mimo-quant binary given as
argument (default target/release/mimo-quant); without the binary the FP4 cases are left as
they are. The tests (crates/quantize/tests/hostile.rs, crates/runtime/tests/hostile.rs) only
read the committed files.
"""
import json
import os
import random
import shutil
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
RNG = random.Random(10)

# A complete one-layer Llama small enough to commit many times over.
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 16, "hidden_act": "silu",
    "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "vocab_size": 32, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "rope_scaling": None,
}
TENSORS = [
    ("lm_head.weight", [32, 32]),
    ("model.embed_tokens.weight", [32, 32]),
    ("model.layers.0.input_layernorm.weight", [32]),
    ("model.layers.0.mlp.down_proj.weight", [32, 64]),
    ("model.layers.0.mlp.gate_proj.weight", [64, 32]),
    ("model.layers.0.mlp.up_proj.weight", [64, 32]),
    ("model.layers.0.post_attention_layernorm.weight", [32]),
    ("model.layers.0.self_attn.k_proj.weight", [16, 32]),
    ("model.layers.0.self_attn.o_proj.weight", [32, 32]),
    ("model.layers.0.self_attn.q_proj.weight", [32, 32]),
    ("model.layers.0.self_attn.v_proj.weight", [16, 32]),
    ("model.norm.weight", [32]),
]
DOWN = "model.layers.0.mlp.down_proj.weight"


def bf16(x):
    return struct.pack("<f", x)[2:]


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def tensor_bytes(name, shape):
    if name.endswith("norm.weight"):
        return b"".join(bf16(1.0) for _ in range(numel(shape)))
    return b"".join(bf16(RNG.uniform(-0.1, 0.1)) for _ in range(numel(shape)))


def header_blob(header):
    hb = json.dumps(header, separators=(",", ":")).encode()
    return hb + b" " * ((8 - len(hb) % 8) % 8)


def st_bytes(header, data, n_override=None):
    hb = header_blob(header)
    n = len(hb) if n_override is None else n_override
    return struct.pack("<Q", n) + hb + data


def read_st(path):
    with open(path, "rb") as f:
        b = f.read()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n]), b[8 + n:]


def dense_model():
    """(header, data) of the good dense checkpoint."""
    header, data, off = {"__metadata__": {"format": "pt"}}, b"", 0
    for name, shape in TENSORS:
        t = tensor_bytes(name, shape)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + len(t)]}
        data += t
        off += len(t)
    return header, data


def folder(group, case, config=CONFIG):
    d = os.path.join(ROOT, group, case)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    if config is not None:
        with open(os.path.join(d, "config.json"), "w") as f:
            f.write(json.dumps(config, indent=1) + "\n")
    return d


def write(d, name, blob):
    with open(os.path.join(d, name), "wb") as f:
        f.write(blob)


CASES = []


# Cases that fail today, with the finding (docs/hostile-findings.md); the tests run them in an
# #[ignore]d test until the owner fixes the code, then the entry is removed here.
KNOWN_ISSUES = {}


def case(group, name, tool, command, expect, what):
    entry = {"case": f"{group}/{name}", "tool": tool, "command": command, "expect": expect,
             "what": what}
    issue = KNOWN_ISSUES.get((entry["case"], tool))
    if issue:
        entry["known_issue"] = issue
    CASES.append(entry)


def source_cases(header, data):
    """Bad dense inputs to `mimo-quant convert`."""
    g = "source"
    good = st_bytes(header, data)

    d = folder(g, "zero-length")
    write(d, "model.safetensors", b"")
    case(g, "zero-length", "mimo-quant", "convert",
         ["model.safetensors", "truncated safetensors file: 0 bytes, header needs 8"],
         "a zero-length model.safetensors")

    d = folder(g, "five-bytes")
    write(d, "model.safetensors", good[:5])
    case(g, "five-bytes", "mimo-quant", "convert",
         ["model.safetensors", "truncated safetensors file: 5 bytes, header needs 8"],
         "a file shorter than the 8-byte length field")

    d = folder(g, "header-longer-than-file")
    hb = header_blob(header)
    write(d, "model.safetensors", st_bytes(header, b"", n_override=len(hb) + 4096))
    case(g, "header-longer-than-file", "mimo-quant", "convert",
         ["model.safetensors", f"truncated safetensors file: {8 + len(hb)} bytes, header needs {8 + len(hb) + 4096}"],
         "the header length field is larger than the file")

    d = folder(g, "header-over-limit")
    write(d, "model.safetensors", st_bytes(header, data, n_override=100 * 1024 * 1024 + 1))
    case(g, "header-over-limit", "mimo-quant", "convert",
         ["model.safetensors", "safetensors header of 104857601 bytes exceeds the 104857600-byte limit"],
         "a header length over the 100 MiB limit")

    d = folder(g, "header-length-u64-max")
    write(d, "model.safetensors", st_bytes(header, data, n_override=2**64 - 1))
    case(g, "header-length-u64-max", "mimo-quant", "convert",
         ["model.safetensors", "header of 18446744073709551615 bytes exceeds"],
         "a header length of u64::MAX (overflows 8 + n)")

    d = folder(g, "header-not-utf8")
    hb = bytearray(header_blob(header))
    hb[3] = 0xFF
    write(d, "model.safetensors", struct.pack("<Q", len(hb)) + bytes(hb) + data)
    case(g, "header-not-utf8", "mimo-quant", "convert",
         ["model.safetensors", "invalid safetensors header JSON: not UTF-8"],
         "a header with an invalid UTF-8 byte")

    d = folder(g, "header-bad-json")
    hb = header_blob(header)[:-10] + b"  ]]]]]]]]"
    write(d, "model.safetensors", struct.pack("<Q", len(hb)) + hb + data)
    case(g, "header-bad-json", "mimo-quant", "convert",
         ["model.safetensors", "invalid safetensors header JSON"],
         "a header that is not valid JSON")

    d = folder(g, "header-json-array")
    hb = b"[1, 2, 3]"
    write(d, "model.safetensors", struct.pack("<Q", len(hb)) + hb)
    case(g, "header-json-array", "mimo-quant", "convert",
         ["model.safetensors", "invalid safetensors header JSON"],
         "a header that is a JSON array, not an object")

    d = folder(g, "metadata-not-strings")
    h = dict(header)
    h["__metadata__"] = {"format": 1}
    write(d, "model.safetensors", st_bytes(h, data))
    case(g, "metadata-not-strings", "mimo-quant", "convert",
         ["model.safetensors", "'__metadata__.format' is not a string"],
         "__metadata__ holding a number")

    # Duplicate key in one header: written by hand, json.dumps cannot.
    d = folder(g, "duplicate-tensor-in-header")
    h = dict(header)
    body = json.dumps(h, separators=(",", ":"))
    dup = json.dumps({DOWN: h[DOWN]}, separators=(",", ":"))[1:-1]
    body = body[:-1] + "," + dup + "}"
    hb = body.encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    write(d, "model.safetensors", struct.pack("<Q", len(hb)) + hb + data)
    case(g, "duplicate-tensor-in-header", "mimo-quant", "convert",
         [f"tensor '{DOWN}' appears twice"],
         "the same tensor name twice in one header")

    # The same tensor in two shards without an index.
    d = folder(g, "duplicate-tensor-across-shards")
    hdr1 = {k: v for k, v in header.items() if k != "model.norm.weight"}
    write(d, "a.safetensors", st_bytes(header, data))
    s = header[DOWN]["data_offsets"]
    write(d, "b.safetensors", st_bytes({DOWN: {"dtype": "BF16", "shape": header[DOWN]["shape"],
                                               "data_offsets": [0, s[1] - s[0]]}}, data[s[0]:s[1]]))
    del hdr1
    case(g, "duplicate-tensor-across-shards", "mimo-quant", "convert",
         [f"tensor '{DOWN}' appears twice", "a.safetensors", "b.safetensors"],
         "the same tensor in two *.safetensors files")

    d = folder(g, "overlapping-offsets")
    h = json.loads(json.dumps(header))
    a, b = h[DOWN]["data_offsets"]
    h["model.layers.0.mlp.gate_proj.weight"]["data_offsets"] = [a + 2, a + 2 + 64 * 32 * 2]
    write(d, "model.safetensors", st_bytes(h, data))
    case(g, "overlapping-offsets", "mimo-quant", "convert",
         ["model.safetensors", "overlap in the data section"],
         "two tensors whose byte ranges overlap")

    d = folder(g, "offsets-out-of-range")
    h = json.loads(json.dumps(header))
    n = 32 * 64 * 2
    h[DOWN]["data_offsets"] = [len(data) + 1000, len(data) + 1000 + n]
    write(d, "model.safetensors", st_bytes(h, data))
    case(g, "offsets-out-of-range", "mimo-quant", "convert",
         ["model.safetensors", f"tensor '{DOWN}': data offsets [{len(data) + 1000}, {len(data) + 1000 + n}] out of range"],
         "a tensor whose offsets point past the data section")

    d = folder(g, "offsets-reversed")
    h = json.loads(json.dumps(header))
    a, b = h[DOWN]["data_offsets"]
    h[DOWN]["data_offsets"] = [b, a]
    write(d, "model.safetensors", st_bytes(h, data))
    case(g, "offsets-reversed", "mimo-quant", "convert",
         ["model.safetensors", f"tensor '{DOWN}': data offsets [{b}, {a}] out of range"],
         "begin > end")

    d = folder(g, "offsets-u64-max")
    h = json.loads(json.dumps(header))
    big = 2**64 - 1
    hb = header_blob(h).replace(
        json.dumps(h[DOWN]["data_offsets"], separators=(",", ":")).encode(),
        f"[{big - 4096},{big}]".encode())
    write(d, "model.safetensors", struct.pack("<Q", len(hb)) + hb + data)
    case(g, "offsets-u64-max", "mimo-quant", "convert",
         ["model.safetensors", f"tensor '{DOWN}'"],
         "offsets near u64::MAX (start + header length overflows)")

    d = folder(g, "size-mismatch")
    h = json.loads(json.dumps(header))
    h[DOWN]["shape"] = [32, 32]
    write(d, "model.safetensors", st_bytes(h, data))
    case(g, "size-mismatch", "mimo-quant", "convert",
         ["model.safetensors", f"tensor '{DOWN}': 4096 bytes in the file, dtype and shape need 2048"],
         "shape disagrees with the byte length")

    d = folder(g, "dtype-mismatch")
    h = json.loads(json.dumps(header))
    h[DOWN]["dtype"] = "F32"
    write(d, "model.safetensors", st_bytes(h, data))
    case(g, "dtype-mismatch", "mimo-quant", "convert",
         ["model.safetensors", f"tensor '{DOWN}': 4096 bytes in the file, dtype and shape need 8192"],
         "dtype disagrees with the byte length")

    d = folder(g, "unknown-dtype")
    h = json.loads(json.dumps(header))
    h[DOWN]["dtype"] = "BF17"
    write(d, "model.safetensors", st_bytes(h, data))
    case(g, "unknown-dtype", "mimo-quant", "convert",
         ["model.safetensors", f"tensor '{DOWN}': unknown dtype 'BF17'"],
         "a dtype safetensors does not define")

    d = folder(g, "shape-negative")
    h = json.loads(json.dumps(header))
    h[DOWN]["shape"] = [-32, 64]
    write(d, "model.safetensors", st_bytes(h, data))
    case(g, "shape-negative", "mimo-quant", "convert",
         ["model.safetensors", f"tensor '{DOWN}': invalid header entry: 'shape' holds a non-integer"],
         "a negative dimension")

    d = folder(g, "shape-overflow")
    h = json.loads(json.dumps(header))
    h[DOWN]["shape"] = [2**32, 2**32, 2]
    write(d, "model.safetensors", st_bytes(h, data))
    case(g, "shape-overflow", "mimo-quant", "convert",
         ["model.safetensors", f"tensor '{DOWN}': invalid header entry: shape product overflows"],
         "dimensions whose product overflows u64")

    d = folder(g, "entry-missing-offsets")
    h = json.loads(json.dumps(header))
    del h[DOWN]["data_offsets"]
    write(d, "model.safetensors", st_bytes(h, data))
    case(g, "entry-missing-offsets", "mimo-quant", "convert",
         ["model.safetensors", f"tensor '{DOWN}': invalid header entry: no array 'data_offsets'"],
         "a header entry without data_offsets")

    d = folder(g, "truncated-data")
    write(d, "model.safetensors", good[:-100])
    # The first tensor (by offset) that the cut reaches is the one named.
    cut = sorted((v["data_offsets"][0], k) for k, v in header.items()
                 if k != "__metadata__" and v["data_offsets"][1] > len(data) - 100)[0][1]
    case(g, "truncated-data", "mimo-quant", "convert",
         ["model.safetensors", f"truncated safetensors file: tensor '{cut}' ends at data byte"],
         "the data section is 100 bytes short")

    d = folder(g, "nan-weight")
    dd = bytearray(data)
    a = header[DOWN]["data_offsets"][0]
    dd[a + 2 * 37:a + 2 * 38] = bf16(float("nan"))
    write(d, "model.safetensors", st_bytes(header, bytes(dd)))
    case(g, "nan-weight", "mimo-quant", "convert",
         ["model.safetensors", f"tensor '{DOWN}' holds a non-finite value (NaN) at element 37"],
         "a NaN in a weight to quantize")

    d = folder(g, "inf-weight")
    dd = bytearray(data)
    dd[a + 2 * 5:a + 2 * 6] = bf16(float("-inf"))
    write(d, "model.safetensors", st_bytes(header, bytes(dd)))
    case(g, "inf-weight", "mimo-quant", "convert",
         ["model.safetensors", f"tensor '{DOWN}' holds a non-finite value (-inf) at element 5"],
         "a -inf in a weight to quantize")

    # Config files.
    d = folder(g, "config-missing", config=None)
    write(d, "model.safetensors", good)
    case(g, "config-missing", "mimo-quant", "convert", ["no config.json in the checkpoint folder"],
         "no config.json")

    d = folder(g, "config-bad-json", config=None)
    write(d, "config.json", b'{"model_type": "llama",')
    write(d, "model.safetensors", good)
    case(g, "config-bad-json", "mimo-quant", "convert", ["config.json", "invalid config JSON"],
         "config.json cut short")

    d = folder(g, "config-not-utf8", config=None)
    write(d, "config.json", b'{"model_type": "ll\xffama"}')
    write(d, "model.safetensors", good)
    case(g, "config-not-utf8", "mimo-quant", "convert", ["config.json", "UTF-8"],
         "config.json with an invalid UTF-8 byte")

    d = folder(g, "config-array", config=None)
    write(d, "config.json", b"[]")
    write(d, "model.safetensors", good)
    case(g, "config-array", "mimo-quant", "convert", ["config.json", "not a JSON object"],
         "config.json holding an array")

    # Shard index.
    def index_case(name, weight_map, expect, what, extra=None):
        dd = folder(g, name)
        write(dd, "model-00001-of-00001.safetensors", good)
        idx = {"metadata": {"total_size": len(data)}, "weight_map": weight_map}
        write(dd, "model.safetensors.index.json", (json.dumps(idx, indent=1) + "\n").encode())
        if extra:
            extra(dd)
        case(g, name, "mimo-quant", "convert", expect, what)

    shard = "model-00001-of-00001.safetensors"
    wm = {n: shard for n, _ in TENSORS}
    index_case("index-dotdot", dict(wm, **{DOWN: "../source/nan-weight/model.safetensors"}),
               ["model.safetensors.index.json", "../source/nan-weight/model.safetensors",
                "is not a plain file name inside the checkpoint folder"],
               "the index names a shard with '..'")
    index_case("index-absolute", dict(wm, **{DOWN: "/etc/hostname"}),
               ["model.safetensors.index.json", "'/etc/hostname'",
                "is not a plain file name inside the checkpoint folder"],
               "the index names an absolute shard path")
    index_case("index-missing-shard", dict(wm, **{DOWN: "model-00002-of-00002.safetensors"}),
               ["model.safetensors.index.json", "model-00002-of-00002.safetensors", "does not exist"],
               "the index names a shard that does not exist")
    index_case("index-wrong-shard", dict(wm, **{"not.in.the.file": shard}),
               ["model.safetensors.index.json", "tensor 'not.in.the.file' is mapped to", "which does not contain it"],
               "the index places a tensor in a shard that does not hold it")
    index_case("index-not-string", dict(wm, **{DOWN: 7}),
               ["model.safetensors.index.json", f"weight_map['{DOWN}'] is not a string"],
               "a weight_map value that is a number")
    index_case("index-no-weight-map", [],
               ["model.safetensors.index.json", "no 'weight_map' object"],
               "weight_map is an array")


def fp4_cases(quant):
    """Tampered copies of good/fp4 for `mimo-quant verify` and `mimo-run bench`."""
    g = "fp4"
    base = os.path.join(ROOT, "good", "fp4")
    good_dense = os.path.join(ROOT, "good", "dense")
    if quant:
        shutil.rmtree(base, ignore_errors=True)
        subprocess.run([quant, "convert", good_dense, "-o", base, "-q"], check=True)
    if not os.path.isdir(base):
        print("no good/fp4 and no mimo-quant binary: FP4 cases not regenerated", file=sys.stderr)
        return
    st = os.path.join(base, "model.safetensors")
    header, data = read_st(st)
    module = "model.layers.0.mlp.down_proj"

    def tampered(name, what, expect_verify, expect_run, edit_header=None, edit_data=None,
                 raw=None, keep_manifest=True):
        d = os.path.join(ROOT, g, name)
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(base, d)
        if not keep_manifest:
            os.remove(os.path.join(d, "mimo-quant.json"))
        h = json.loads(json.dumps(header))
        dd = bytearray(data)
        if edit_header:
            edit_header(h)
        if edit_data:
            edit_data(h, dd)
        blob = raw(st_bytes(h, bytes(dd))) if raw else st_bytes(h, bytes(dd))
        write(d, "model.safetensors", blob)
        if expect_verify is not None:
            case(g, name, "mimo-quant", "verify", expect_verify, what)
        if expect_run is not None:
            case(g, name, "mimo-run", "bench", expect_run, what)

    def poke(tensor, off, val):
        def f(h, dd):
            a = h[tensor]["data_offsets"][0]
            dd[a + off:a + off + len(val)] = val
        return f

    def flip(tensor, off):
        def f(h, dd):
            dd[h[tensor]["data_offsets"][0] + off] ^= 0xFF
        return f

    last = sorted((v["data_offsets"][1], k) for k, v in header.items() if k != "__metadata__")[-1][1]
    tampered("truncated", "the FP4 shard is 40 bytes short",
             ["model.safetensors", f"tensor '{last}' ends at data byte"],
             ["model.safetensors", f"tensor '{last}' ends at data byte"],
             raw=lambda b: b[:-40])
    tampered("nan-block-scale", "an E4M3 block scale set to NaN (0x7f)",
             [f"{module}: block scale 3 is NaN"],
             [f"'{module}.weight_scale'", "NaN block scale"],
             edit_data=poke(f"{module}.weight_scale", 3, b"\x7f"))
    for label, val in [("zero", 0.0), ("nan", float("nan")), ("inf", float("inf")), ("negative", -2.0)]:
        shown = {"zero": "0", "nan": "NaN", "inf": "inf", "negative": "-2"}[label]
        tampered(f"global-scale-{label}", f"weight_global_scale set to {shown}",
                 [f"tensor '{module}.weight_global_scale' holds global scale {shown}"],
                 [f"'{module}.weight_global_scale'", f"{shown}"],
                 edit_data=poke(f"{module}.weight_global_scale", 0, struct.pack("<f", val)))
    tampered("global-scale-denormal",
             "weight_global_scale 1e-45 (no manifest): the dequantized weights overflow to inf",
             [f"'{module}.weight_global_scale'"], [f"'{module}.weight_global_scale'"],
             edit_data=poke(f"{module}.weight_global_scale", 0, struct.pack("<f", 1e-45)),
             keep_manifest=False)

    def scale_dtype(h):
        h[f"{module}.weight_scale"]["dtype"] = "U8"
    tampered("scale-wrong-dtype", "weight_scale stored as U8 instead of F8_E4M3",
             [f"tensor '{module}.weight_scale' has dtype U8, the layout needs F8_E4M3"],
             [f"'{module}.weight_scale'", "U8"], edit_header=scale_dtype)

    def packed_shape(h):
        h[f"{module}.weight_packed"]["shape"] = [64, 16]
    tampered("packed-wrong-shape", "weight_packed reshaped [32, 32] -> [64, 16] (same bytes)",
             [f"tensor '{module}.weight_scale' has shape [32, 4], expected [64, 32/16]"],
             [f"'{module}.weight_scale'"], edit_header=packed_shape)

    def drop_scale(h):
        del h[f"{module}.weight_scale"]
    tampered("scale-missing", "the weight_scale tensor removed from the header",
             [f"tensor '{module}.weight_scale' required by the nvfp4-pack-quantized layout is missing"],
             [f"{module}.weight_scale"], edit_header=drop_scale)

    tampered("packed-byte-flipped", "one packed FP4 byte changed; the manifest hash no longer matches",
             ["model.safetensors", "does not match the manifest"], None,
             edit_data=flip(f"{module}.weight_packed", 0))

    # The manifest names files outside the folder: verify must not read them.
    d = os.path.join(ROOT, g, "manifest-names-dev-zero")
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(base, d)
    m = json.load(open(os.path.join(d, "mimo-quant.json")))
    m["files"].append({"name": "/dev/zero", "bytes": 1, "sha256": "00"})
    write(d, "mimo-quant.json", (json.dumps(m, indent=2) + "\n").encode())
    case(g, "manifest-names-dev-zero", "mimo-quant", "verify", ["/dev/zero"],
         "mimo-quant.json lists the file name '/dev/zero' (verify must refuse, not read it forever)")

    d = os.path.join(ROOT, g, "manifest-invalid")
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(base, d)
    write(d, "mimo-quant.json", b"{ not json")
    h = json.loads(json.dumps(header))
    dd = bytearray(data)
    flip(f"{module}.weight_packed", 0)(h, dd)
    write(d, "model.safetensors", st_bytes(h, bytes(dd)))
    case(g, "manifest-invalid", "mimo-quant", "verify", ["mimo-quant.json"],
         "a tampered shard next to an unreadable mimo-quant.json (verify must not report OK)")


def main():
    quant = sys.argv[1] if len(sys.argv) > 1 else None
    header, data = dense_model()
    d = folder("good", "dense")
    write(d, "model.safetensors", st_bytes(header, data))
    source_cases(header, data)
    fp4_cases(quant)
    CASES.sort(key=lambda c: (c["tool"], c["case"], c["command"]))
    with open(os.path.join(ROOT, "cases.json"), "w") as f:
        f.write(json.dumps({"cases": CASES}, indent=1) + "\n")
    print(f"{len(CASES)} cases")


if __name__ == "__main__":
    main()
