"""GGUF files -> Hugging Face folders (config, tokenizer with its chat template, safetensors shards).

transformers' GGUF loader de-quantizes every tensor into a plain ``nn.Linear`` model, but leaves its
GGUF quantizer attached, which makes ``save_pretrained`` refuse ("not serializable"). Detaching the
quantizer (``model.hf_quantizer = None``) and dropping ``config.quantization_config`` gives a normal
model that saves as safetensors and reloads with identical logits.

Used by the ``base`` stage for ``.gguf`` sources and by the demo build (abliterate/sources/demo.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from abliterate.errors import existing, fail
from abliterate.model.modelio import quiet_libraries

GGUF_MAGIC = b"GGUF"


def check_gguf(gguf_file: str | Path) -> Path:
    """Return ``gguf_file`` if it exists and starts with the GGUF magic, else fail with one line."""
    path = existing(gguf_file, "file", "GGUF file", "check the path given to `abliterate use`",
                    "give the path of a .gguf file")
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        fail(f"cannot read GGUF file {path} ({exc.strerror or exc}); check its permissions")
    if magic != GGUF_MAGIC:
        fail(f"{path} is not a GGUF file (it does not start with 'GGUF'); re-download it or give another file")
    return path


def _require_libraries() -> None:
    import importlib.util

    for module, package in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            fail(f"loading a GGUF file needs the '{package}' package: pip install {package}")


def load_gguf(gguf_file: str | Path, dtype: str = "float32"):
    """Load a GGUF file as a de-quantized, serializable ``(model, tokenizer)`` pair on the CPU.

    ``dtype`` is the torch dtype name the de-quantized weights are kept in. The tokenizer keeps the
    chat template stored in the GGUF metadata (``tokenizer.chat_template``), if there is one.
    """
    path = check_gguf(gguf_file)
    _require_libraries()
    quiet_libraries()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.resolve().parent), path.name
    try:
        with _quiet_gguf_bar():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    except Exception as exc:  # noqa: BLE001 - any failure to parse a user's file is a user error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fail(f"cannot load GGUF file {path}: {first[:300]} (corrupt file or unsupported architecture?)")
    detach_quantizer(model)
    model.eval()
    return model, tokenizer


@contextlib.contextmanager
def _quiet_gguf_bar() -> Iterator[None]:
    """transformers' GGUF reader draws its own tqdm bar, which its progress switch does not reach."""
    import functools

    try:
        from transformers import modeling_gguf_pytorch_utils as reader
    except ImportError:  # pragma: no cover - moved in some version: keep the bar
        yield
        return
    saved = getattr(reader, "tqdm", None)
    if saved is None:
        yield
        return
    reader.tqdm = functools.partial(saved, disable=True)
    try:
        yield
    finally:
        reader.tqdm = saved


def detach_quantizer(model) -> None:
    """Make a GGUF-loaded model serializable: its weights are already plain tensors."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property in some versions: it follows hf_quantizer
            pass


def save_folder(model, tokenizer, out: str | Path, max_shard_size: str) -> None:
    """Save ``model`` (safetensors shards of at most ``max_shard_size``) and ``tokenizer`` into ``out``.

    ``out`` is written in place; callers that need atomicity pass a temporary folder.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
    except ValueError as exc:
        if "shard" in str(exc).lower() or "size" in str(exc).lower():
            fail(f"max shard size {max_shard_size!r} is not valid ({exc}); use a size such as 100MB or 2GB")
        raise
    tokenizer.save_pretrained(out)
    for path in out.iterdir():  # some files are written through private temp files (mode 0600)
        if path.is_file():
            path.chmod(0o644)


def convert_gguf(gguf_file: Path, out: Path, max_shard_size: str) -> None:
    """Convert ``gguf_file`` into a Hugging Face folder at ``out`` (replaced atomically).

    The weights are saved in the dtype transformers de-quantizes to (float32): a GGUF's quantized
    values are exact in float32, so nothing is lost; the folder holds config.json,
    generation_config.json, the tokenizer files (with the chat template, if the GGUF has one),
    the safetensors shards and, when there are several, their index.
    """
    from abliterate.formats.atomic import atomic_path

    validate_shard_size(max_shard_size)
    model, tokenizer = load_gguf(gguf_file)
    with atomic_path(out) as tmp:
        save_folder(model, tokenizer, tmp, max_shard_size)


def validate_shard_size(max_shard_size: str) -> None:
    """Fail with one line unless ``max_shard_size`` reads like 100MB, 2GB, 500KB or a byte count."""
    import re

    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*", str(max_shard_size), re.I):
        fail(f"max shard size {max_shard_size!r} is not a size; use e.g. 100MB or 2GB (model.max-shard-size)")
