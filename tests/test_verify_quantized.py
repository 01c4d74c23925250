"""verify on quantized checkpoints: edited tensors compared de-quantized against the re-quantization
floor, scales and codes covered; fails when an edited tensor is left unedited or a scale changes."""

from __future__ import annotations

import os

import pytest

import quant_util as qu
import tiny
from ablation_util import plan_and_ablate
from abliterate.finalize import finalize
from abliterate.formats.safetensors_io import read_header
from abliterate.verification import verify

CASES = [("llama", "fp8-block", {}), ("gpt_oss", "mxfp4", {"intermediate_size": 64}), ("qwen3_moe", "nvfp4", {})]


@pytest.mark.parametrize("family,fmt,overrides", CASES, ids=[f"{f}-{q}" for f, q, _ in CASES])
def test_verify_quantized(family, fmt, overrides, tmp_path):
    floats = tiny.make_model(family, tmp_path / "float", layers=2, **overrides)
    base = qu.quantize_model(floats, tmp_path / "base", fmt)
    out = plan_and_ablate(base, tmp_path, layers="0-1", measurement="1",
                          targets="attention,mlp,experts,shared-experts,router")
    finalize(base, tmp_path / "plan", tmp_path / "directions.safetensors", out)
    rows, passed = verify(base, out, tmp_path / "plan", tmp_path / "directions.safetensors")
    assert passed, rows
    recomputed = next(r for r in rows if r[0].startswith("edited tensors recomputed"))
    assert recomputed[1].startswith(f"{recomputed[1].split('/')[1].split()[0]}/"), recomputed  # all bit-identical
    layers = [r for r in rows if r[0].startswith("layer")]
    assert len(layers) == 2 and all("re-quantization floor" in r[0] for r in layers)
    for row in layers:  # the component is far below what plain re-quantization would leave
        floor = float(row[0].split("floor ")[1].rstrip(")"))
        assert float(row[1]) < floor / 4, row

    # an edited quantized tensor put back unedited, then a scale of an untouched tensor changed: both fail
    scale_suffix = {"fp8-block": "_scale_inv", "mxfp4": "_scales", "nvfp4": "_scale"}[fmt]
    edited = [n for f in sorted(base.glob("*.safetensors")) for n in read_header(f).tensors
              if n.endswith(scale_suffix) and ".layers.1." in n and ("down_proj" in n)]
    shard = next(f.name for f in base.glob("*.safetensors") if edited[0] in read_header(f).tensors)
    info = read_header(base / shard).tensors[edited[0].removesuffix(scale_suffix) + ("_blocks" if fmt == "mxfp4" else "")]
    os.chmod(out / shard, 0o644)
    original = (out / shard).read_bytes()
    data = bytearray(original)
    data[info.begin:info.end] = (base / shard).read_bytes()[info.begin:info.end]
    (out / shard).write_bytes(bytes(data))
    rows, passed = verify(base, out, tmp_path / "plan", tmp_path / "directions.safetensors")
    assert not passed and any(r[-1] == "FAIL" and r[0].startswith("layer 1") for r in rows), rows
    assert any(r[0].startswith("edited tensors recomputed") and r[-1] == "FAIL" for r in rows), rows
    (out / shard).write_bytes(original)
    shard, begin = next((f.name, i.begin) for f in sorted(base.glob("*.safetensors"))
                        for n, i in read_header(f).tensors.items() if n.endswith(scale_suffix) and "up_proj" in n)
    os.chmod(out / shard, 0o644)
    data = bytearray((out / shard).read_bytes())
    data[begin] ^= 1
    (out / shard).write_bytes(bytes(data))
    rows, passed = verify(base, out, tmp_path / "plan", tmp_path / "directions.safetensors")
    assert not passed and any(r[0].startswith("untouched") and r[-1] == "FAIL" for r in rows), rows
