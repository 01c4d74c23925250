"""Tiny quantized checkpoints for the tests: a saved tiny model's weights quantized by a format's
rules (block-scaled FP8, compressed-tensors FP8 per tensor / per channel, gpt-oss MXFP4, ModelOpt
NVFP4), with the ``quantization_config`` transformers (or the format's own tools) expect, and the
way back: a float32 folder de-quantized tensor by tensor, for formats transformers cannot load on
a CPU."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

BLOCK = (16, 32)  # block-scaled FP8 blocks; the tiny models' hidden size is 64
CONFIGS = {
    "fp8-block": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": list(BLOCK)},
    "fp8-tensor": {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
                   "ignore": ["lm_head"], "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                       "num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}}}},
    "mxfp4": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                  "model.embed_tokens", "lm_head"]},
    "nvfp4": {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]},
}
CONFIGS["fp8-channel"] = json.loads(json.dumps(CONFIGS["fp8-tensor"]).replace('"tensor"', '"channel"'))
MXFP4_TENSORS = ("mlp.experts.down_proj", "mlp.experts.gate_up_proj")


def quantizable(name: str, ndim: int) -> bool:
    """The 2-D linear weights of the decoder layers (routers, norms, embeddings and the head stay float)."""
    return ndim == 2 and ".layers." in name and name.endswith("_proj.weight")


def quantize_tensor(name: str, tensor, fmt: str, hints: dict | None = None) -> dict:
    """One float tensor -> its stored tensors in ``fmt`` (``{name: torch tensor}``); ``hints``: stored
    tensors whose scales are tried first (as the ablate stage does with the old scales)."""
    import numpy as np
    import torch

    from abliterate.quant import fp8, mxfp4, nvfp4

    w = tensor.float().numpy()
    if fmt == "mxfp4":  # the bf16 layout [E, in, out] is stored [E, out, in / 32, 16]
        hint = None if hints is None else hints[name + "_scales"].numpy()
        blocks, scales = mxfp4.quantize(np.ascontiguousarray(w.transpose(0, 2, 1)), hint=hint)
        return {name + "_blocks": torch.from_numpy(blocks), name + "_scales": torch.from_numpy(scales)}
    if fmt == "nvfp4":
        hint = (None, None) if hints is None else (hints[name + "_scale"].view(torch.uint8).numpy(),
                                                     float(hints[name + "_scale_2"]))
        packed, codes, scale_2 = nvfp4.quantize(w, *hint)
        return {name: torch.from_numpy(packed), name + "_scale": torch.from_numpy(codes).view(torch.float8_e4m3fn),
                name + "_scale_2": torch.tensor(scale_2, dtype=torch.float32)}
    rows, cols = w.shape
    if fmt == "fp8-block":
        grid, block = (math.ceil(rows / BLOCK[0]), math.ceil(cols / BLOCK[1])), BLOCK
    else:
        grid, block = ((1, 1), (rows, cols)) if fmt == "fp8-tensor" else ((rows, 1), (1, cols))
    suffix = "_scale_inv" if fmt == "fp8-block" else "_scale"
    hint = None if hints is None else hints[name + suffix].float().numpy()
    codes, scales = fp8.quantize(w, grid, block, hint=hint)
    scale = torch.from_numpy(scales)
    scale = scale.reshape(grid) if fmt != "fp8-tensor" else scale.reshape(1)
    return {name: torch.from_numpy(codes).view(torch.float8_e4m3fn), name + suffix: scale}


def quantize_model(src: Path, dst: Path, fmt: str) -> Path:
    """Write ``dst``: the model folder ``src`` with its linear weights (MXFP4: fused experts) quantized."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    for shard in sorted(p.name for p in src.glob("*.safetensors")):
        out = {}
        for name, tensor in load_file(src / shard).items():
            if fmt == "mxfp4" and name.endswith(MXFP4_TENSORS) or fmt != "mxfp4" and quantizable(name, tensor.ndim):
                out.update(quantize_tensor(name, tensor, fmt))
            else:
                out[name] = tensor
        save_file(out, dst / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in out})
    for other in src.iterdir():
        if other.is_file() and not other.name.endswith(".safetensors"):
            shutil.copy(other, dst / other.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = CONFIGS[fmt]
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    index = dst / "model.safetensors.index.json"
    if index.exists():
        doc = json.loads(index.read_text())
        doc["weight_map"] = dict(sorted(weight_map.items()))
        index.write_text(json.dumps(doc, indent=2))
    return dst


def dequantize_stored(stored: dict, name: str, fmt: str | None = None):
    """The logical float32 tensor ``name`` from its stored tensors (``{name: torch tensor}``)."""
    import numpy as np
    import torch

    from abliterate.quant import fp8, mxfp4, nvfp4

    if name + "_blocks" in stored:  # stored [E, out, in / 32, 16]; the bf16 layout is [E, in, out]
        w = mxfp4.dequantize(stored[name + "_blocks"].numpy(), stored[name + "_scales"].numpy())
        return torch.from_numpy(np.ascontiguousarray(w.transpose(0, 2, 1)))
    t = stored[name]
    if name + "_scale_2" in stored:
        codes = stored[name + "_scale"].view(torch.uint8).numpy()
        return torch.from_numpy(nvfp4.dequantize(t.numpy(), codes, float(stored[name + "_scale_2"])))
    if t.dtype == torch.float8_e4m3fn:
        scale = stored.get(name + "_scale_inv", stored.get(name + "_scale")).float().numpy()
        block = BLOCK if name + "_scale_inv" in stored else None
        grid, blk = fp8.grid_of(*t.shape, () if scale.size == 1 else scale.shape, block)
        return torch.from_numpy(fp8.dequantize(t.view(torch.uint8).numpy(), scale, grid, blk))
    return t.float()


def dequantized(folder: Path, dst: Path) -> dict:
    """Every tensor of a quantized folder de-quantized by our codecs (float32 torch tensors, plain names);
    also written as a float32 model folder ``dst`` transformers loads without any quantizer."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    everything, shard_of = {}, {}
    for shard in sorted(p.name for p in folder.glob("*.safetensors")):
        stored = load_file(folder / shard)
        out = {}
        for name in stored:
            if name.endswith(("_scale", "_scale_2", "_scale_inv", "_scales")):
                continue
            plain = name[: -len("_blocks")] if name.endswith("_blocks") else name
            out[plain] = dequantize_stored(stored, plain)
        save_file(out, dst / shard, metadata={"format": "pt"})
        everything.update(out)
        shard_of.update({name: shard for name in out})
    for other in folder.iterdir():
        if other.is_file() and not other.name.endswith(".safetensors"):
            shutil.copy(other, dst / other.name)
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    index = dst / "model.safetensors.index.json"
    if index.exists():
        doc = json.loads(index.read_text())
        doc["weight_map"] = dict(sorted(shard_of.items()))
        index.write_text(json.dumps(doc, indent=2))
    return everything


def grid_step(values, scale, grid: str):
    """The spacing of a format's grid at each ``|value|`` (``scale`` per element): a quantized
    value must lie within one such step of the float32 value it stands for."""
    import numpy as np

    a = np.abs(np.asarray(values, np.float64)) / np.asarray(scale, np.float64)
    if grid == "e4m3":
        with np.errstate(divide="ignore"):
            return np.exp2(np.maximum(np.floor(np.log2(a)), -6) - 3) * scale
    return np.where(a < 2, 0.5, np.where(a < 4, 1.0, 2.0)) * scale
