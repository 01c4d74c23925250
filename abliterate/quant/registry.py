"""Which codec stores a target tensor: from the checkpoint's ``quantization_config`` and tensor names.

:func:`method_of` reads ``quantization_config`` (``config.json``, or ModelOpt's
``hf_quant_config.json``) and refuses, in one line, every method that cannot be edited in place
(bitsandbytes, GPTQ, AWQ, HQQ, ...). :func:`storage_of` describes how one target tensor is
stored: ``None`` when it is plain floats, else a small JSON-ready record the plan keeps and the
ablate stage follows (:mod:`abliterate.quant.rewrite`):

* ``fp8-block``: ``weight`` E4M3 + ``weight_scale_inv`` float32 per block (``quant_method: fp8``);
* ``fp8-scaled``: ``weight`` E4M3 + ``weight_scale`` per tensor or per row (``compressed-tensors``
  float weights, strategy ``tensor`` or ``channel``; ModelOpt ``FP8``);
* ``mxfp4``: ``x_blocks`` + ``x_scales`` (``quant_method: mxfp4``, gpt-oss experts, stored
  transposed relative to the bf16 layout);
* ``nvfp4``: ``weight`` packed E2M1 + ``weight_scale`` E4M3 + ``weight_scale_2`` (ModelOpt ``NVFP4``).

A weight and its scales must sit in one shard (every released checkpoint we know keeps them
together); otherwise the plan says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from abliterate.errors import fail

EDITABLE = ("fp8", "compressed-tensors", "mxfp4", "modelopt")
ADVICE = "abliterate a bf16/fp16 checkpoint of this model (or its FP8, MXFP4 or NVFP4 release) instead"


def method_of(model: Path) -> dict | None:
    """The checkpoint's quantization config (``quant_method`` lower-cased), ``None`` if unquantized;
    one line and a non-zero exit for a method this tool cannot edit in place."""
    config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    qc = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    extra = Path(model) / "hf_quant_config.json"  # ModelOpt's older releases keep it beside config.json
    if qc is None and extra.is_file():
        qc = dict(json.loads(extra.read_text(encoding="utf-8")).get("quantization") or {}, quant_method="modelopt")
    if not qc:
        return None
    qc = dict(qc)
    method = str(qc.get("quant_method", "?")).lower()
    qc["quant_method"] = method
    detail = ""
    if method == "bitsandbytes":
        detail = " 4-bit" if qc.get("load_in_4bit") else " 8-bit" if qc.get("load_in_8bit") else ""
    elif method in ("gptq", "awq"):
        detail = f" {qc.get('bits', '?')}-bit"
    if method not in EDITABLE:
        fail(f"{model} is quantized with {method}{detail} (config.json quantization_config); its weights cannot be "
             f"edited in place: {ADVICE}")
    if method == "fp8" and str(qc.get("scale_fmt", "float")) != "float":
        fail(f"{model} stores FP8 block scales as {qc.get('scale_fmt')} (powers of two); only float32 "
             f"weight_scale_inv is supported: {ADVICE}")
    if method == "modelopt":
        algo = str(qc.get("quant_algo") or "").upper()
        if algo not in ("FP8", "NVFP4"):
            fail(f"{model} is quantized with ModelOpt {algo or '?'}; only its FP8 and NVFP4 can be edited: {ADVICE}")
    if method == "compressed-tensors":
        fmt = str(qc.get("format") or "?")
        if fmt not in ("float-quantized", "naive-quantized"):
            fail(f"{model} is compressed-tensors {fmt}; only float-quantized FP8 weights (per tensor or per channel) "
                 f"can be edited: {ADVICE}")
        for group in (qc.get("config_groups") or {}).values():
            weights = group.get("weights") or {}
            if weights.get("type") != "float" or int(weights.get("num_bits", 0)) != 8 \
                    or weights.get("strategy") not in ("tensor", "channel"):
                fail(f"{model} is compressed-tensors with {weights.get('num_bits')}-bit {weights.get('type')} weights "
                     f"(strategy {weights.get('strategy')}); only FP8 per tensor or per channel can be edited: {ADVICE}")
    return qc


def storage_of(name: str, info: dict, qc: dict | None, layout: str) -> tuple[dict, str, tuple[int, ...]] | None:
    """``(storage record, stored dtype, logical shape)`` of target ``name``, or ``None`` if it is stored
    as plain floats. ``info``: every tensor of the checkpoint (name -> TensorInfo); ``qc``: from
    :func:`method_of`; ``layout``: the target's layout (``columns`` or ``rows``)."""
    if qc is None:
        return None
    method = qc["quant_method"]
    if method == "mxfp4" and name + "_blocks" in info:
        blocks, scales = info[name + "_blocks"], info.get(name + "_scales")
        ok = (scales is not None and blocks.dtype == scales.dtype == "U8" and len(blocks.shape) == 4
              and blocks.shape[-1] == 16 and tuple(scales.shape) == tuple(blocks.shape[:-1]))
        if not ok:
            fail(f"{name}_blocks/_scales do not have the MXFP4 layout [E, rows, G, 16] / [E, rows, G]; "
                 "the checkpoint is damaged or of an unknown variant")
        e, rows, groups, _ = blocks.shape
        record = {"format": "mxfp4", "blocks": name + "_blocks", "scales": name + "_scales"}
        return record, "U8", (e, groups * 32, rows)  # the bf16 layout: [E, in, out]
    weight = info.get(name)
    if weight is None or not name.endswith(".weight"):
        return None
    if method == "fp8" and weight.dtype == "F8_E4M3" and name + "_scale_inv" in info:
        from abliterate.quant.fp8 import grid_of

        scale = info[name + "_scale_inv"]
        block = tuple(int(b) for b in (qc.get("weight_block_size") or (128, 128)))
        if len(weight.shape) != 2 or scale.dtype != "F32" or grid_of(*weight.shape, scale.shape, block) is None:
            fail(f"{name} ({weight.dtype} {list(weight.shape)}) and its weight_scale_inv ({scale.dtype} "
                 f"{list(scale.shape)}) do not fit block size {list(block)}; only 2-D float32-scaled blocks are supported")
        return {"format": "fp8-block", "weight": name, "scale": name + "_scale_inv", "block": list(block)}, \
            "F8_E4M3", tuple(weight.shape)
    if method in ("compressed-tensors", "modelopt") and weight.dtype == "F8_E4M3" and name + "_scale" in info:
        from abliterate.quant.fp8 import grid_of

        scale = info[name + "_scale"]
        if len(weight.shape) != 2 or scale.dtype not in ("F32", "BF16", "F16") \
                or grid_of(*weight.shape, scale.shape, None) is None:
            fail(f"{name} ({list(weight.shape)}) has a weight_scale of {scale.dtype} {list(scale.shape)}; only one "
                 "float scale per tensor or per row is supported")
        return {"format": "fp8-scaled", "weight": name, "scale": name + "_scale"}, "F8_E4M3", tuple(weight.shape)
    if method == "modelopt" and weight.dtype == "U8" and name + "_scale" in info and name + "_scale_2" in info:
        scale, scale_2 = info[name + "_scale"], info[name + "_scale_2"]
        rows, half = weight.shape if len(weight.shape) == 2 else (0, 0)
        if scale.dtype != "F8_E4M3" or tuple(scale.shape) != (rows, half * 2 // 16) or scale_2.dtype != "F32" \
                or scale_2.numel != 1 or rows == 0:
            fail(f"{name} and its NVFP4 scales do not have the layout uint8 [rows, cols/2], float8_e4m3 "
                 "[rows, cols/16], float32 scalar; the checkpoint is damaged or of an unknown variant")
        return {"format": "nvfp4", "weight": name, "scale": name + "_scale", "scale_2": name + "_scale_2"}, \
            "U8", (rows, half * 2)
    return None


def stored_names(record: dict) -> list[str]:
    """Every on-disk tensor a storage record covers (rewritten together)."""
    return [record[k] for k in ("weight", "blocks", "scales", "scale", "scale_2") if k in record]


def quantized_target(name: str, layout: str, names: dict[str, str], info: dict, qc: dict | None):
    """:func:`storage_of` for the plan, with the one-shard check: ``(record, dtype, logical shape, shard
    file)``, or ``None`` for a plain tensor."""
    found = storage_of(name, info, qc, layout)
    if found is None:
        return None
    files = sorted({names[n] for n in stored_names(found[0])})
    if len(files) != 1:
        fail(f"{name} and its scales are split over shards {', '.join(files)}; each shard is edited on its own, so "
             "they must be in one shard: re-save the checkpoint with them together")
    return (*found, files[0])


def check_loadable(model: Path) -> None:
    """Fail in one line where transformers cannot load a quantized checkpoint on this machine (the
    stages that run the model: capture, baseline, evaluate, search). Block-scaled FP8 and MXFP4 load
    (de-quantized where the device has no kernel); ModelOpt has no transformers loader (loading it
    anyway would put raw codes into float weights), compressed-tensors needs its package."""
    import importlib.util

    if not (Path(model) / "config.json").is_file():
        return
    qc = method_of(model)
    if qc is None:
        return
    if qc["quant_method"] == "modelopt":
        fail(f"{model} is a ModelOpt {qc.get('quant_algo')} checkpoint, which transformers cannot load, so capture, "
             "baseline, evaluate and search cannot run it; plan and ablate can edit it with directions measured on "
             "the model's bf16 release")
    if qc["quant_method"] == "compressed-tensors" and importlib.util.find_spec("compressed_tensors") is None:
        fail(f"{model} is a compressed-tensors checkpoint; loading it needs the compressed-tensors package: "
             "pip install compressed-tensors")
