"""Model folders: validating them, reading their weight map, loading model and tokenizer, batching.

Torch and transformers are imported inside functions so that importing this module is cheap.
"""

from __future__ import annotations

import json
from pathlib import Path

from abliterate.errors import existing, fail

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_model_dir(path: str | Path) -> Path:
    """Return ``path`` if it is a Hugging Face folder with safetensors weights, else fail clearly."""
    path = existing(path, "folder", "model folder", "run `dvc repro base` or `abliterate use SOURCE`",
                    "give a Hugging Face model folder (config.json + *.safetensors)")
    if not (path / "config.json").is_file():
        fail(f"{path} has no config.json, so it is not a Hugging Face model folder")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
            fail(
                f"{path} holds only .bin/.pt weights; convert them to safetensors first "
                "(load the model and call save_pretrained(out, safe_serialization=True))"
            )
        fail(f"{path} has no *.safetensors weight files")
    return path


def weight_map(path: str | Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index (sharded) or the single safetensors file."""
    path = Path(path)
    index = path / INDEX_NAME
    if index.is_file():
        try:
            table = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            fail(f"{index} is not a valid safetensors index ({type(exc).__name__}); re-download or re-save the model")
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            fail(f"{index} is not a valid safetensors index (weight_map is not a map of file names); re-download it")
        for file in sorted(set(table.values())):
            if not plain_shard_name(file):
                fail(f"{index} names the shard {file[:80]!r}, which is not a plain *.safetensors file name inside "
                     f"{path}; refusing it (a name must not hold '/', '\\' or '..'): re-download the model")
        return dict(table)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if len(files) != 1:
        fail(f"{path} has {len(files)} safetensors files but no {INDEX_NAME}; add the index or keep one file")
    from abliterate.formats.safetensors_io import read_header

    return {name: files[0] for name in sorted(read_header(path / files[0]).tensors)}


def plain_shard_name(name: str) -> bool:
    """True for a plain ``*.safetensors`` file name: no folder part, no ``..``, no control character."""
    return (name.endswith(".safetensors") and name not in (".safetensors",) and "/" not in name and "\\" not in name
            and ".." not in name and name.isprintable() and name == name.strip())


def shard_files(path: str | Path) -> list[str]:
    """The weight shard file names of a model folder, sorted."""
    return sorted(set(weight_map(path).values()))


def shard_table(files: list[str]) -> dict[str, str]:
    """Shard key -> file name, as stored in model.yaml: keys are 1-based, zero-padded to 5 digits."""
    return {f"{i:05d}": name for i, name in enumerate(sorted(files), start=1)}


def quiet_libraries() -> None:
    """Silence transformers' and the hub's own progress bars and advisory warnings."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass


def read_config(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def text_config(config: dict) -> dict:
    """The language-model part of a config (multimodal configs nest it under ``text_config``)."""
    return config.get("text_config") or config


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        fail(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_tokenizer(path: str | Path):
    quiet_libraries()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | Path, dtype: str = "float32", device: str = "auto"):
    """Load a causal LM for inference (eval mode, no grad needed) on ``device``."""
    quiet_libraries()
    import torch
    from transformers import AutoModelForCausalLM

    check_model_dir(path)
    from abliterate.quant.registry import check_loadable

    check_loadable(path)  # quantized checkpoints transformers cannot load here: one line, not a traceback
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype))
    model.to(pick_device(device))
    model.eval()
    model.requires_grad_(False)
    return model


def decoder_layers(model):
    """The model's list of decoder layers (``model.model.layers`` for every supported family)."""
    candidates = [model.get_decoder()] if hasattr(model, "get_decoder") else []
    inner = getattr(model, "model", None)
    # Llama4ForCausalLM.get_decoder() returns the model itself; multimodal models nest the text model
    candidates += [inner, getattr(inner, "language_model", None)]
    layers = next((c.layers for c in candidates if c is not None and hasattr(c, "layers")), None)
    if layers is None:
        fail(f"cannot find the decoder layers of {type(model).__name__}; this architecture is not supported")
    return layers


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted by length, stable), so padding is small."""
    if batch_size < 1:
        fail(f"batch size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad_left(sequences: list[list[int]], pad_id: int, device: str = "cpu"):
    """Left-pad token id lists -> (input_ids, attention_mask, position_ids), each ``[B, T]``.

    Position ids count real tokens only, so a padded prompt sees the same positions as alone.
    """
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)
