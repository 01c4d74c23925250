"""Functional truth for every family: edit on disk, reload with transformers, look at what each
edited layer writes into the residual stream (hooks), and at the bytes that must not change."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import tiny
from ablation_util import layer_writes, plan_and_ablate, plan_edits, relative_component
from abliterate.formats.safetensors_io import read_header, read_rows, row_chunks

ALL = "attention,mlp,experts,shared-experts,router"


def _tensor(path, info):
    fd = os.open(path, os.O_RDONLY)
    try:
        return torch.from_numpy(np.concatenate([read_rows(fd, info, a, b) for a, b in row_chunks(info)])).double()
    finally:
        os.close(fd)


def _check_bytes_and_norms(base, out, edits):
    """Untouched tensors and headers byte-identical; norm-preserving edits keep column/row norms."""
    by_name = {e["tensor"]: e for e, _ in edits}
    for shard in sorted(p.name for p in base.glob("*.safetensors")):
        old, new = (base / shard).read_bytes(), (out / shard).read_bytes()
        header = read_header(base / shard)
        assert old[: header.data_start] == new[: header.data_start]
        for name, info in header.tensors.items():
            if name not in by_name:
                assert old[info.begin:info.end] == new[info.begin:info.end], name
                continue
            edit = by_name[name]
            w0, w1 = _tensor(base / shard, info), _tensor(out / shard, info)
            assert not torch.equal(w0, w1), name
            if edit["norm_preserve"]:
                dim = 0 if edit["layout"] == "columns" else 1
                n0, n1 = w0.norm(dim=dim), w1.norm(dim=dim)
                live = n0 > 0  # e.g. the all-zero padding row of an embedding
                assert ((n1 - n0).abs()[live] / n0[live]).max() < 1e-5, name
                assert (n1[~live] == 0).all()


def _router_checks(model_dir, edits):
    """A router sees norm(x) = g * x / rms(x): moving x along r must only rescale its logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    routers = [(e, v) for e, v in edits if e["role"] == "router"]
    worst = 0.0
    for edit, vectors in routers:
        path = edit["tensor"].removesuffix(".weight").replace("block_sparse_moe", "mlp")
        weight = model.get_submodule(path).weight.detach().double()  # [E, hidden]
        layer = model.model.layers[edit["layer"]]
        norm = layer.post_attention_layernorm
        r = vectors[edit["direction"]].float()
        x = torch.randn(5, r.numel())
        with torch.no_grad():
            shifted = x + 3.0 * r
            logits = norm(x).double() @ weight.T
            moved = norm(shifted).double() @ weight.T
            ratio = (shifted.pow(2).mean(-1, keepdim=True) / x.pow(2).mean(-1, keepdim=True)).sqrt().double()
        worst = max(worst, float(((moved * ratio - logits).abs().max() / logits.abs().max())))
    return worst, len(routers)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_edited_layers_write_nothing_along_r(family, tmp_path):
    torch.manual_seed(0)
    base = tiny.make_model(family, tmp_path / "base", layers=3)
    out = plan_and_ablate(base, tmp_path, layers="0-2", measurement="2", targets=ALL)
    edits = plan_edits(tmp_path)
    before, after = layer_writes(base), layer_writes(out)
    for k in range(3):
        directions = {tuple(v[e["direction"]].tolist()) for e, v in edits if e["layer"] == k}
        assert len(directions) == 1  # one direction per layer (biprojection depends on k)
        r = torch.tensor(next(iter(directions)), dtype=torch.float64)
        assert relative_component(before[k], r) > 1e-3
        assert relative_component(after[k], r) < 1e-5, f"{family} layer {k}"
    _check_bytes_and_norms(base, out, edits)
    if any(e["role"] == "router" for e, _ in edits):
        moved, count = _router_checks(out, edits)
        assert count >= 2 and moved < 1e-5  # every MoE layer (DeepSeek: layer 0 is dense)
        moved_base, _ = _router_checks(base, edits)
        assert moved_base > 1e-3


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_oss", "qwen3_next"])
def test_plain_projection_also_removes_r(family, tmp_path):
    base = tiny.make_model(family, tmp_path / "base", layers=2)
    out = plan_and_ablate(base, tmp_path, layers="0-1", measurement="1", norm_preserve=False,
                          projected=False)
    edits = plan_edits(tmp_path)
    assert all(not e["norm_preserve"] and not e["projected"] for e, _ in edits)
    after = layer_writes(out)
    for k in range(2):
        e, v = next((e, v) for e, v in edits if e["layer"] == k)
        assert relative_component(after[k], v[e["direction"]]) < 1e-5


def test_bf16_edits_are_cast_back(tmp_path):
    base = tiny.make_model("qwen2_moe", tmp_path / "base", layers=2, dtype="bfloat16")
    out = plan_and_ablate(base, tmp_path, layers="0-1", measurement="1")
    for shard in base.glob("*.safetensors"):
        assert read_header(base / shard.name).tensors.keys() == read_header(out / shard.name).tensors.keys()
        assert {i.dtype for i in read_header(out / shard.name).tensors.values()} == {"BF16"}
    after = layer_writes(out)
    e, v = next((e, v) for e, v in plan_edits(tmp_path) if e["layer"] == 1)
    assert relative_component(after[1], v[e["direction"]]) < 2e-2  # bf16 rounding re-injects a little of r


def test_scale_zero_leaves_every_byte_and_scale_minus_one_adds_r_back(tmp_path):
    base = tiny.make_model("gpt_oss", tmp_path / "base", layers=2)
    zero = plan_and_ablate(base, tmp_path / "zero", layers="0-1", measurement="1", scale=0.0)
    for shard in base.glob("*.safetensors"):
        assert (zero / shard.name).read_bytes() == shard.read_bytes()

    def attention_writes(model_dir):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        got = {}
        model.model.layers[0].self_attn.register_forward_hook(lambda m, a, o: got.setdefault("w", o[0].detach()))
        with torch.no_grad():
            model(input_ids=torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(0)))
        return got["w"].reshape(-1, got["w"].shape[-1]).double()

    added = plan_and_ablate(base, tmp_path / "add", layers="0", measurement="1", scale=-1.0, targets="attention",
                            norm_preserve=False)
    e, v = next(iter(plan_edits(tmp_path / "add")))
    r = v[e["direction"]]
    # layer 0's attention sees the unchanged embeddings, so its write along r exactly doubles
    old, new = attention_writes(base) @ r, attention_writes(added) @ r
    assert torch.allclose(new, 2 * old, rtol=1e-4, atol=1e-6)


def test_untied_embeddings_are_edited_as_rows(tmp_path):
    base = tiny.make_model("llama", tmp_path / "base", layers=2)
    out = plan_and_ablate(base, tmp_path, layers="1", measurement="1", targets="embeddings,attention")
    edits = plan_edits(tmp_path)
    e, v = next((e, v) for e, v in edits if e["role"] == "embeddings")
    assert e["layer"] is None and e["tensor"] == "model.embed_tokens.weight"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    rows = model.get_input_embeddings().weight.detach().double()
    rows = rows[rows.norm(dim=1) > 0]  # the padding row is all zeros
    assert ((rows @ v[e["direction"]]).abs() / rows.norm(dim=1)).max() < 1e-5
    _check_bytes_and_norms(base, out, edits)
