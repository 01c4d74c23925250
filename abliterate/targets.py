"""Which tensors of which architecture are edited, and how: the targets table.

Every supported architecture (by ``model_type`` of the text config) lists rules that map an
on-disk tensor name to a *role* (the ``ablate.targets`` names: attention, mlp, experts,
shared-experts, router, embeddings), a *layout* (``columns``: a 2-D writer ``[hidden, in]``;
``rows``: the residual is the last axis: fused experts ``[E, in, hidden]``, routers, embeddings,
biases) and the norm whose gain sits between the tensor and the residual stream:

* Gemma 2/3 put ``post_attention_layernorm`` / ``post_feedforward_layernorm`` between
  ``o_proj`` / ``down_proj`` and the residual add;
* a router reads the residual through the pre-MLP norm (``post_attention_layernorm`` in
  Llama-style layers).

Gemma and Qwen3-Next norms compute ``x * (1 + weight)`` (``gain_offset = 1``); the others
``x * weight``. Names are matched exactly, with the layer number parsed as an integer, so
``model.layers.2.`` never matches layer 20. Names are read from the safetensors headers, never
from a loaded model (transformers fuses experts in memory but saves them per expert).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from abliterate.errors import fail
from abliterate.formats.safetensors_io import FLOAT_DTYPES

ROLES = ("attention", "mlp", "experts", "shared-experts", "router", "embeddings")


@dataclass(frozen=True)
class Rule:
    """One tensor name pattern under a decoder layer (``{e}``: an expert number)."""

    pattern: str  # relative to the layer prefix, e.g. "mlp.experts.{e}.down_proj.weight"
    role: str
    layout: str  # "columns" | "rows"
    bias: bool = False  # biases take the plain edit
    gain: str | None = None  # norm weight (relative to the layer prefix) between tensor and residual

    def regex(self) -> re.Pattern:
        return re.compile(re.escape(self.pattern).replace(re.escape("{e}"), r"(?P<e>\d+)") + r"\Z")


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    rules: tuple[Rule, ...]
    gain_offset: float = 0.0  # 1.0 where norms compute x * (1 + weight)


def _attn(gain: str | None = None) -> tuple[Rule, ...]:
    return (Rule("self_attn.o_proj.weight", "attention", "columns", gain=gain),
            Rule("self_attn.o_proj.bias", "attention", "rows", bias=True, gain=gain))


def _mlp(prefix: str = "mlp", gain: str | None = None) -> tuple[Rule, ...]:
    return (Rule(f"{prefix}.down_proj.weight", "mlp", "columns", gain=gain),
            Rule(f"{prefix}.down_proj.bias", "mlp", "rows", bias=True, gain=gain))


PRE_MLP = "post_attention_layernorm.weight"  # the pre-MLP norm of Llama-style layers
EXPERTS = (Rule("mlp.experts.{e}.down_proj.weight", "experts", "columns"),)
SHARED = (Rule("mlp.shared_expert.down_proj.weight", "shared-experts", "columns"),
          Rule("mlp.shared_experts.down_proj.weight", "shared-experts", "columns"))
ROUTER = (Rule("mlp.gate.weight", "router", "rows", gain=PRE_MLP),)
EMBEDDINGS = Rule("embed_tokens.weight", "embeddings", "rows")  # relative to the model prefix

ARCHITECTURES = (
    Architecture("llama-style dense", ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "granite"),
                 _attn() + _mlp()),
    Architecture("gemma 2/3", ("gemma2", "gemma3_text", "gemma3"),
                 _attn("post_attention_layernorm.weight") + _mlp(gain="post_feedforward_layernorm.weight"),
                 gain_offset=1.0),
    Architecture("qwen-moe / olmoe / deepseek", ("qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"),
                 _attn() + _mlp() + EXPERTS + SHARED + ROUTER),
    Architecture("qwen3-next", ("qwen3_next",),
                 _attn() + (Rule("linear_attn.out_proj.weight", "attention", "columns"),)
                 + _mlp() + EXPERTS + SHARED + ROUTER, gain_offset=1.0),
    Architecture("mixtral", ("mixtral",),
                 _attn() + (Rule("block_sparse_moe.experts.{e}.w2.weight", "experts", "columns"),
                            Rule("block_sparse_moe.gate.weight", "router", "rows", gain=PRE_MLP))),
    Architecture("gpt-oss", ("gpt_oss",),
                 _attn() + (Rule("mlp.experts.down_proj", "experts", "rows"),
                            Rule("mlp.experts.down_proj_bias", "experts", "rows", bias=True),
                            Rule("mlp.router.weight", "router", "rows", gain=PRE_MLP))),
    Architecture("llama4", ("llama4_text", "llama4"),
                 _attn() + _mlp("feed_forward")
                 + (Rule("feed_forward.experts.down_proj", "experts", "rows"),
                    Rule("feed_forward.shared_expert.down_proj.weight", "shared-experts", "columns"),
                    Rule("feed_forward.router.weight", "router", "rows", gain=PRE_MLP))),
)

# The decoder's layer prefix, tried in order (text models, then multimodal wrappers).
MODEL_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "model.text_model.", "transformer.")
WRITER_HINTS = ("o_proj", "out_proj", "down_proj", "w2", "c_proj", "dense_4h_to_h", "fc2", "wo", "dense",
                "output_linear")
QUANT_SUFFIXES = (".input_scale", "_blocks", "_scales", "_scale_inv", "_scale_2", "_scale", ".absmax", ".quant_map",
                  ".quant_state", ".SCB", ".weight_format", ".qweight", ".qzeros", ".g_idx")


@dataclass(frozen=True)
class Match:
    name: str
    layer: int | None  # None: embeddings
    rule: Rule


def find_architecture(config: dict) -> Architecture | None:
    """The table entry of a (text) config's ``model_type``, or ``None``."""
    model_type = config.get("model_type", "")
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    return None


def model_prefix(names) -> str | None:
    """``model.`` (or a multimodal wrapper's text prefix) such that ``{prefix}layers.0.`` exists."""
    names = list(names)
    for prefix in MODEL_PREFIXES:
        head = f"{prefix}layers."
        if any(n.startswith(head) and n[len(head):].split(".", 1)[0].isdigit() for n in names):
            return prefix
    return None


def _layer_of(name: str, prefix: str) -> tuple[int, str] | None:
    head = f"{prefix}layers."
    if not name.startswith(head):
        return None
    number, _, rest = name[len(head):].partition(".")
    if not number.isdigit() or not rest:
        return None
    return int(number), rest


def is_writer_like(relative: str) -> bool:
    parts = [p for p in relative.split(".") if p not in ("weight", "bias")]
    return any(p == h or p.startswith(h + "_") for p in parts for h in WRITER_HINTS)


def writer_like_summary(names) -> str:
    """Writer-like tensor names with layer/expert numbers folded (``layers.{k}``, ``.{e}.``)."""
    found = set()
    for name in names:
        if is_writer_like(name):
            folded = re.sub(r"\.layers\.\d+\.", ".layers.{k}.", name)
            found.add(re.sub(r"\.experts\.\d+\.", ".experts.{e}.", folded))
    listed = sorted(found)
    if not listed:
        return "none"
    return ", ".join(listed[:12]) + (f" and {len(listed) - 12} more" if len(listed) > 12 else "")


def match_tensors(names, config: dict) -> tuple[Architecture, str, list[Match], list[str]]:
    """Classify every tensor name: ``(architecture, model prefix, matches, unmatched writer-likes)``.

    ``unmatched`` lists names under a decoder layer that look like residual writers but fit no
    rule (quantized variants such as ``down_proj_blocks`` included); the caller decides whether
    one of them lies in a layer it was asked to edit.
    """
    names = sorted(names)
    arch = find_architecture(config)
    prefix = model_prefix(names)
    if arch is None or prefix is None:
        kind = config.get("model_type") or "?"
        classes = ",".join(config.get("architectures") or []) or "?"
        fail(f"architecture {kind!r} ({classes}) is not supported by the targets table yet; "
             f"writer-like tensors found: {writer_like_summary(names)}")
    compiled = [(rule, rule.regex()) for rule in arch.rules]
    matches: list[Match] = []
    unmatched: list[str] = []
    for name in names:
        if name == prefix + EMBEDDINGS.pattern:
            matches.append(Match(name, None, EMBEDDINGS))
            continue
        parsed = _layer_of(name, prefix)
        if parsed is None:
            continue
        layer, rest = parsed
        for rule, regex in compiled:
            if regex.match(rest):
                matches.append(Match(name, layer, rule))
                break
        else:
            if is_writer_like(rest):
                unmatched.append(name)
    return arch, prefix, matches, unmatched


def quantized_twin(name: str) -> str | None:
    """For a quantized storage name (``x_blocks``, ``x.weight_scale_inv``, ...), the plain name."""
    for suffix in QUANT_SUFFIXES:
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            return base if suffix not in ("_scale_inv", ".input_scale") or base.endswith(".weight") else base + ".weight"
    return None


def check_storable(match: Match, dtype: str, names: set[str], arch: Architecture) -> None:
    """Fail if a targeted tensor is stored quantized (FP8, MXFP4, int) rather than as floats."""
    scaled = [n for n in (match.name + "_scale_inv", match.name + "_scale", match.name + ".absmax") if n in names]
    if dtype not in FLOAT_DTYPES or scaled:
        extra = f" with {scaled[0]}" if scaled else ""
        fail(f"tensor {match.name} is stored as {dtype}{extra} (quantized); editing quantized tensors is not "
             f"supported yet: use a bf16/fp16/fp32 checkpoint of this {arch.name} model")


def gain_name(match: Match, prefix: str) -> str | None:
    if match.rule.gain is None or match.layer is None:
        return None
    return f"{prefix}layers.{match.layer}.{match.rule.gain}"


def parse_targets(spec: str) -> tuple[str, ...]:
    """``ablate.targets`` (a comma list) -> the roles, unique, in ``ROLES`` order."""
    names = [t.strip() for t in str(spec).split(",") if t.strip()]
    unknown = [t for t in names if t not in ROLES]
    if unknown or not names:
        fail(f"ablate.targets: unknown target {unknown[0] if unknown else spec!r}; choose from {', '.join(ROLES)}")
    return tuple(sorted(set(names), key=ROLES.index))
