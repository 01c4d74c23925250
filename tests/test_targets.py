"""The targets table: which on-disk tensors of each family are edited, as what, behind which norm."""

from __future__ import annotations

from collections import Counter

import pytest

import tiny
from abliterate.errors import UserError
from abliterate.model.modelio import read_config, text_config, weight_map
from abliterate.targets import is_writer_like, match_tensors, quantized_twin

DENSE = {"attention": 1, "mlp": 1}
# roles found in decoder layer 1 of a 2-layer tiny model (4 experts), from the on-disk layouts
EXPECTED_LAYER_1 = {
    "llama": DENSE, "mistral": DENSE, "qwen2": DENSE, "qwen3": DENSE, "phi3": DENSE,
    "gemma2": DENSE, "gemma3": DENSE,
    "qwen2_moe": {"attention": 1, "experts": 4, "shared-experts": 1, "router": 1},
    "qwen3_moe": {"attention": 1, "experts": 4, "router": 1},
    "mixtral": {"attention": 1, "experts": 4, "router": 1},
    "olmoe": {"attention": 1, "experts": 4, "router": 1},
    "deepseek_v2": {"attention": 1, "experts": 4, "shared-experts": 1, "router": 1},
    "deepseek_v3": {"attention": 1, "experts": 4, "shared-experts": 1, "router": 1},
    "gpt_oss": {"attention": 2, "experts": 2, "router": 1},  # o_proj + bias, fused down_proj + bias
    "llama4": {"attention": 1, "experts": 1, "shared-experts": 1, "router": 1},
    "qwen3_next": {"attention": 1, "experts": 4, "shared-experts": 1, "router": 1},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: tiny.make_model(f, root / f, layers=2) for f in tiny.FAMILIES}


def _classify(path):
    return match_tensors(weight_map(path), text_config(read_config(path)))


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_every_family_is_classified(models, family):
    arch, prefix, matches, unmatched = _classify(models[family])
    assert prefix == "model." and unmatched == []
    layer1 = Counter(m.rule.role for m in matches if m.layer == 1)
    assert dict(layer1) == EXPECTED_LAYER_1[family]
    assert [m.name for m in matches if m.layer is None] == ["model.embed_tokens.weight"]
    for m in matches:
        if m.rule.role == "router":
            assert m.rule.gain == "post_attention_layernorm.weight" and m.rule.layout == "rows"
        fused = m.name.endswith("experts.down_proj") or m.name.endswith("experts.down_proj_bias")
        assert (m.rule.layout == "rows") == (fused or m.rule.bias or m.rule.role in ("router", "embeddings"))


def test_gemma_writers_fold_their_post_norms_and_gemma_norms_add_one(models):
    arch, _, matches, _ = _classify(models["gemma3"])
    gains = {m.name.split(".", 3)[3]: m.rule.gain for m in matches if m.layer == 0}
    assert gains == {"self_attn.o_proj.weight": "post_attention_layernorm.weight",
                     "mlp.down_proj.weight": "post_feedforward_layernorm.weight"}
    assert arch.gain_offset == 1.0
    assert _classify(models["qwen3_next"])[0].gain_offset == 1.0  # zero-centred norms too
    assert _classify(models["llama"])[0].gain_offset == 0.0


def test_special_layouts_are_found_by_their_own_names(models):
    names = {m.name for m in _classify(models["mixtral"])[2]}
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    qn = [m.name for m in _classify(models["qwen3_next"])[2] if m.layer == 0 and m.rule.role == "attention"]
    assert qn == ["model.layers.0.linear_attn.out_proj.weight"]  # linear-attention layer
    dense0 = {m.rule.role for m in _classify(models["deepseek_v3"])[2] if m.layer == 0}
    assert dense0 == {"attention", "mlp"}  # first_k_dense_replace


def test_layer_numbers_match_exactly():
    names = [f"model.layers.{k}.{t}" for k in range(30) for t in ("self_attn.o_proj.weight", "mlp.down_proj.weight")]
    names += ["model.embed_tokens.weight", "lm_head.weight"]
    _, _, matches, _ = match_tensors(names, {"model_type": "llama"})
    layer2 = sorted(m.name for m in matches if m.layer == 2)
    assert layer2 == ["model.layers.2.mlp.down_proj.weight", "model.layers.2.self_attn.o_proj.weight"]
    assert {m.layer for m in matches if m.layer is not None} == set(range(30))


def test_unknown_architecture_lists_the_writer_like_tensors():
    names = [f"transformer.h.{k}.attn.c_proj.weight" for k in range(3)] + ["transformer.h.0.mlp.c_fc.weight"]
    with pytest.raises(UserError) as err:
        match_tensors(names, {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    message = str(err.value)
    assert "'gpt2'" in message and "GPT2LMHeadModel" in message and "transformer.h.0.attn.c_proj.weight" in message
    assert "c_fc" not in message


def test_quantized_storage_names_point_at_their_plain_tensor():
    assert quantized_twin("model.layers.1.mlp.experts.down_proj_blocks") == "model.layers.1.mlp.experts.down_proj"
    assert quantized_twin("model.layers.1.mlp.experts.down_proj_scales") == "model.layers.1.mlp.experts.down_proj"
    assert quantized_twin("model.layers.1.self_attn.o_proj.weight_scale_inv") == "model.layers.1.self_attn.o_proj.weight"
    assert quantized_twin("model.layers.1.self_attn.o_proj.weight") is None
    assert is_writer_like("mlp.experts.down_proj_blocks") and not is_writer_like("mlp.gate_up_proj")
