"""``ablate.quantized-edits: bfloat16``: the edited tensors of a quantized checkpoint written unquantized.

Each case quantizes a tiny random model by a format's rules and ablates it with bfloat16 output. The
converted tensors take the bf16 release's names, layout and dtype, their scales are gone and every
other tensor keeps its bytes; the config names the converted modules as not to quantize and the index
lists exactly the shards' tensors; each edited tensor is the exact edit of the de-quantized base
rounded once to bfloat16; transformers loads the folder (where it can load the format on a CPU) and
the direction's share of each edited writer's output drops to bfloat16 rounding; ``verify`` passes
and catches a changed converted tensor and a config put back.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import quant_util as qu
import tiny
from ablation_util import plan_and_ablate, plan_edits
from abliterate.finalize import finalize
from abliterate.formats.safetensors_io import read_header
from abliterate.verification import verify
from test_ablate_quantized import TARGETS, _exact_edit, _writer_shares

CASES = [("llama", "fp8-block", {}), ("gpt_oss", "mxfp4", {"intermediate_size": 64}), ("qwen3_moe", "nvfp4", {}),
         ("llama", "fp8-channel", {})]
LOADS = {"fp8-block", "mxfp4"}  # transformers de-quantizes these on a CPU
SCALES = ("_scale_inv", "_scale", "_scale_2", "_scales")


def _all_tensors(folder):
    return {n: (f.name, i) for f in sorted(folder.glob("*.safetensors")) for n, i in read_header(f).tensors.items()}


@pytest.mark.parametrize("family,fmt,overrides", CASES, ids=[f"{f}-{q}" for f, q, _ in CASES])
def test_edited_quantized_tensors_are_written_as_bfloat16(family, fmt, overrides, tmp_path):
    floats = tiny.make_model(family, tmp_path / "float", layers=3, **overrides)
    base = qu.quantize_model(floats, tmp_path / "base", fmt)
    out = plan_and_ablate(base, tmp_path, layers="0-1", measurement="2", targets=TARGETS, quantized_edits="bfloat16")
    edits = plan_edits(tmp_path)
    quantized = {e["tensor"] for e, _ in edits if e.get("storage")}
    assert quantized and all(e["storage"]["output"] == "bfloat16" for e, _ in edits if e.get("storage"))

    # tensors: converted ones in bf16 under their logical names, scales gone, everything else byte-identical
    before, after = _all_tensors(base), _all_tensors(out)
    for name in quantized:
        assert after[name][1].dtype == "BF16" and ".layers.2." not in name
    if fmt == "mxfp4":  # a converted experts module is converted whole: gate_up_proj too, though not edited
        for layer in (0, 1):
            for part in ("gate_up_proj", "down_proj"):
                name = f"model.layers.{layer}.mlp.experts.{part}"
                assert after[name][1].dtype == "BF16" and name + "_blocks" not in after and name + "_scales" not in after
    plain_edits = {e["tensor"] for e, _ in edits} - quantized  # e.g. gpt-oss's bf16 attention
    for name, (file, info) in before.items():
        if name in plain_edits:
            assert after[name][1].dtype == info.dtype and after[name][1].shape == info.shape
        elif ".layers.2." in name or not any(name.startswith(m + ".") for m in _modules(out)):
            got_file, got = after[name]
            assert got.dtype == info.dtype and got.shape == info.shape, name
            assert (out / got_file).read_bytes()[got.begin:got.end] == (base / file).read_bytes()[info.begin:info.end]
        elif name.endswith(SCALES):
            assert name not in after, name
    assert any(i.dtype != "BF16" and ".layers.2." in n and not n.endswith(SCALES) for n, (_, i) in after.items()
               if "proj" in n)  # the unedited layer keeps its format

    # config and index
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"] if "quantization_config" in config else None
    listed = (qc or {}).get({"nvfp4": "exclude_modules", "fp8-channel": "ignore"}.get(fmt, "modules_to_not_convert"))
    assert set(_modules(out)) <= set(listed) and all(".layers.2." not in m for m in _modules(out))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {n: f for n, (f, _) in after.items()}
    if "total_size" in index.get("metadata", {}):  # changed by what the shards' tensors changed
        base_total = json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        assert index["metadata"]["total_size"] - base_total == \
            sum(i.nbytes for _, i in after.values()) - sum(i.nbytes for _, i in before.values())

    # values: the exact edit of the de-quantized base, rounded once to bfloat16
    base_deq = qu.dequantized(base, tmp_path / "base-deq")
    from safetensors.torch import load_file

    written = {}
    for shard in out.glob("*.safetensors"):
        written.update(load_file(shard))
    for name in quantized:
        exact = _exact_edit(base_deq[name], [(e, v) for e, v in edits if e["tensor"] == name])
        assert torch.equal(written[name], exact.float().to(torch.bfloat16)) or \
            (written[name].double() - exact).abs().max() <= 2.0**-8 * exact.abs().max(), name

    # function: the direction is gone from each edited writer's output, to bfloat16 rounding
    if fmt in LOADS:
        shares_before, shares_after = _writer_shares(base, edits), _writer_shares(out, edits)
        for key in shares_after:
            assert shares_after[key] <= shares_before[key] / 50 and shares_after[key] < 2e-2, key

    # verify: passes, and fails on a changed converted tensor and on the base's config put back
    finalize(base, tmp_path / "plan", tmp_path / "directions.safetensors", out)
    rows, passed = verify(base, out, tmp_path / "plan", tmp_path / "directions.safetensors")
    assert passed, rows
    name = sorted(quantized)[0]
    file, info = after[name]
    data = bytearray((out / file).read_bytes())
    data[info.begin + 1] ^= 0x40  # the high byte of the first value: its exponent
    original = (out / file).read_bytes()
    (out / file).chmod(0o644)
    (out / file).write_bytes(bytes(data))
    rows, passed = verify(base, out, tmp_path / "plan", tmp_path / "directions.safetensors")
    assert not passed and any(r[0].startswith("edited tensors recomputed") and r[-1] == "FAIL" for r in rows), rows
    (out / file).write_bytes(original)
    (out / "config.json").chmod(0o644)
    (out / "config.json").write_bytes((base / "config.json").read_bytes())
    rows, passed = verify(base, out, tmp_path / "plan", tmp_path / "directions.safetensors")
    assert not passed and any("config.json differs" in r[0] for r in rows), rows


def _modules(out) -> list[str]:
    """The modules the ablated folder's plan converted (from the plan's output file)."""
    return json.loads((out.parent / "plan" / "_output.json").read_text())["not_converted"]


def test_requantize_keeps_the_config_and_index_bytes(tmp_path):
    """The default writes no output changes: carry copies config and index byte for byte."""
    floats = tiny.make_model("llama", tmp_path / "float", layers=2)
    base = qu.quantize_model(floats, tmp_path / "base", "fp8-block")
    out = plan_and_ablate(base, tmp_path, layers="0-1", measurement="1", targets="attention")
    assert json.loads((tmp_path / "plan" / "_output.json").read_text())["not_converted"] == []
    for name in ("config.json", "model.safetensors.index.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    assert np.all([read_header(f).tensors.keys() == read_header(out / f.name).tensors.keys()
                   for f in base.glob("*.safetensors")])


@pytest.mark.slow
def test_the_pipeline_writes_bfloat16_edits_and_switches_back(tmp_path):
    """`dvc repro finalize` on an MXFP4 model with bfloat16 edits: a folder transformers loads, verify passes;
    switching back to requantize reruns plan, the edited shards, the carries and finalize, nothing upstream."""
    import sys

    import yaml
    from transformers import AutoModelForCausalLM

    from dvc_project import dvc, environment, make_project, run, set_params, stages_run

    env = environment(tmp_path)
    floats = tiny.make_model("gpt_oss", tmp_path / "float", layers=2, intermediate_size=64)
    model = qu.quantize_model(floats, tmp_path / "source", "mxfp4")
    root = make_project(tmp_path, model, env, params={"ablate.layers": "1", "ablate.targets": "experts",
                                                      "ablate.quantized-edits": "bfloat16"})
    dvc(root, env, "repro", "finalize")
    out = root / "artifacts" / "model"
    config = json.loads((out / "config.json").read_text())
    assert "model.layers.1.mlp.experts" in config["quantization_config"]["modules_to_not_convert"]
    assert read_header(next(f for f in out.glob("*.safetensors") if "model.layers.1.mlp.experts.down_proj"
                            in read_header(f).tensors)).tensors["model.layers.1.mlp.experts.down_proj"].dtype == "BF16"
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert loaded.model.layers[1].mlp.experts.down_proj.shape == (4, 64, 64)
    run([sys.executable, "-m", "stages.verify", "models/base", "artifacts/model"], root, env)

    set_params(root / "params.yaml", **{"ablate.quantized-edits": "requantize"})
    ran = stages_run(dvc(root, env, "repro", "finalize"))
    tables = yaml.safe_load((root / "model.yaml").read_text())
    carried = {f"carry@{k}" for k, name in tables["files"].items() if name in ("config.json",
                                                                               "model.safetensors.index.json")}
    shards = {f"ablate@{k}" for k in tables["shards"]}
    copies = {f"carry@{k}" for k in tables["files"]}  # every carry reads _output.json (one foreach, one deps list)
    assert {"plan", "finalize"} | carried <= ran <= {"plan", "finalize"} | copies | shards, ran
    assert (out / "config.json").read_bytes() == (root / "models" / "base" / "config.json").read_bytes()
    run([sys.executable, "-m", "stages.verify", "models/base", "artifacts/model"], root, env)
