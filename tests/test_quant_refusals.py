"""Quantization methods that cannot be edited in place: one line naming the method and what to do,
a non-zero exit, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tiny
from ablation_util import write_directions, write_model_yaml, write_scores

BAD = {
    "bitsandbytes 4-bit": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "gptq 4-bit": {"quant_method": "gptq", "bits": 4, "group_size": 128},
    "awq 4-bit": {"quant_method": "awq", "bits": 4, "version": "gemm"},
    "hqq": {"quant_method": "hqq", "quant_config": {"weight_quant_params": {"nbits": 4}}},
    "compressed-tensors pack-quantized": {"quant_method": "compressed-tensors", "format": "pack-quantized"},
    "ModelOpt W4A8_AWQ": {"quant_method": "modelopt", "quant_algo": "W4A8_AWQ"},
    "ue8m0": {"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    model = tiny.make_model("llama", root / "model", layers=2)
    return root, model, write_directions(root / "directions.safetensors", 2), write_scores(root / "layers.json", 2, 1)


@pytest.mark.parametrize("what", list(BAD))
def test_method_is_refused_in_one_line(what, inputs, tmp_path):
    root, model, directions, scores = inputs
    bad = tmp_path / "model"
    bad.mkdir()
    for f in model.iterdir():
        os.link(f, bad / f.name)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = BAD[what]
    (bad / "config.json").unlink()
    (bad / "config.json").write_text(json.dumps(config))
    shards = write_model_yaml(bad, tmp_path / "model.yaml")
    out = tmp_path / "plan"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-m", "stages.plan", "--model", str(bad), "--shards", str(shards),
                           "--directions", str(directions), "--scores", str(scores), "--out", str(out),
                           "--layers", "0-1", "--overrides-from", ""], env=env, capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and what.split()[0].lower() in lines[0].lower(), lines[0]
    assert "instead" in lines[0] or "supported" in lines[0]
    assert not out.exists()


def test_loader_reads_fp8_and_mxfp4_and_refuses_what_transformers_cannot_load(tmp_path):
    import importlib.util

    import torch

    import quant_util as qu
    from abliterate.errors import UserError
    from abliterate.model.modelio import load_model

    floats = tiny.make_model("llama", tmp_path / "float", layers=2)
    fp8 = load_model(qu.quantize_model(floats, tmp_path / "fp8", "fp8-block"), device="cpu")
    plain = load_model(floats, device="cpu")
    diff = (fp8.model.layers[1].self_attn.o_proj.weight - plain.model.layers[1].self_attn.o_proj.weight).abs()
    assert 0 < float(diff.max()) < 0.1 * float(plain.model.layers[1].self_attn.o_proj.weight.abs().max())
    gpt = tiny.make_model("gpt_oss", tmp_path / "gpt", layers=2, intermediate_size=64)
    mx = load_model(qu.quantize_model(gpt, tmp_path / "mxfp4", "mxfp4"), device="cpu")
    assert mx.model.layers[0].mlp.experts.down_proj.dtype == torch.float32
    with pytest.raises(UserError, match="ModelOpt NVFP4 checkpoint, which transformers cannot load"):
        load_model(qu.quantize_model(floats, tmp_path / "nvfp4", "nvfp4"))
    if importlib.util.find_spec("compressed_tensors") is None:
        with pytest.raises(UserError, match="needs the compressed-tensors package"):
            load_model(qu.quantize_model(floats, tmp_path / "ct", "fp8-channel"))


def test_scales_in_another_shard_and_a_stale_plan_are_one_line_errors(tmp_path):
    import yaml

    import quant_util as qu
    from ablation_util import plan_and_ablate
    from abliterate.errors import UserError
    from abliterate.formats.plans import load_shard_plan
    from abliterate.shard_edit import ablate_shard
    from safetensors.torch import load_file, save_file

    floats = tiny.make_model("llama", tmp_path / "float", layers=2)
    base = qu.quantize_model(floats, tmp_path / "base", "fp8-block")
    work = tmp_path / "work"
    work.mkdir()
    plan_and_ablate(base, work, layers="0-1", measurement="1", targets="attention")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    weight = "model.layers.1.self_attn.o_proj.weight"
    shards = yaml.safe_load((work / "model.yaml").read_text())["shards"]
    key, name = next((k, n) for k, n in shards.items() if n == index["weight_map"][weight])
    (tmp_path / "stale").mkdir()
    stale = tmp_path / "stale" / name  # the scale grid of the edited tensor changed since the plan
    tensors = load_file(base / name)
    tensors[weight + "_scale_inv"] = tensors[weight + "_scale_inv"][:1]
    save_file(tensors, stale, metadata={"format": "pt"})
    with pytest.raises(UserError, match=f"quantized tensor {weight} in .* the plan is out of date"):
        ablate_shard(stale, load_shard_plan(work / "plan" / f"{key}.json"), tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()

    # move the scale into another shard: plan refuses (each shard is edited on its own)
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != name)
    moved = load_file(base / name)
    scale = moved.pop(weight + "_scale_inv")
    save_file(moved, base / name, metadata={"format": "pt"})
    extra = load_file(base / other)
    extra[weight + "_scale_inv"] = scale
    save_file(extra, base / other, metadata={"format": "pt"})
    index["weight_map"][weight + "_scale_inv"] = other
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    again = tmp_path / "again"
    again.mkdir()
    with pytest.raises(UserError, match="split over shards"):
        plan_and_ablate(base, again, layers="0-1", measurement="1", targets="attention")
