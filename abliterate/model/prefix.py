"""The chat template's shared prefix, computed once per pass and reused by every batch.

Rendered prompts of one set start with the same tokens (the system block and the user role header:
about half of a short prompt). Capture and the search's scorer (:mod:`abliterate.model.validation`)
use it. :func:`shared_length` finds that prefix; :func:`prefix_cache` runs it
once through the model (batch 1) and keeps the model's own KV cache; :func:`suffix_inputs` builds
each batch's inputs on a copy of that cache, repeated over the batch. The suffixes are padded on the
right, so every real token keeps its distance to the prefix (sliding-window layers see what the
plain forward sees) and nothing attends to the padding after it.

The result equals the plain forward up to float rounding (different matmul shapes), not bit for bit,
so :func:`agreement` measures it: capture compares the first batch both ways and falls back to the
plain forward when a model's cache does not reproduce it (e.g. linear-attention layers, whose
multi-token forward ignores a cached state).
"""

from __future__ import annotations

# Relative error (per captured vector) under which the prefix path counts as the plain forward.
TOLERANCE = 1e-4
# Prefixes shorter than this are not worth a separate pass.
MIN_PREFIX = 4
# Capture uses the prefix only when it holds at least this share of all tokens: the cache copies and
# the first batch's check cost more than a few shared tokens save (measured: 7 of ~60 tokens, 1.3x slower).
MIN_SHARE = 0.25


def shared_length(sequences: list[list[int]], keep: int = 1) -> int:
    """Tokens every sequence starts with, leaving at least ``keep`` (>= 1) tokens of each after them.

    ``keep`` covers the positions a caller reads: they must lie after the shared prefix. Returns 0
    when the shared part is shorter than :data:`MIN_PREFIX`.
    """
    if not sequences:
        return 0
    first = sequences[0]
    length = max(min(len(s) for s in sequences) - max(keep, 1), 0)
    for seq in sequences[1:]:
        same = 0
        while same < length and seq[same] == first[same]:
            same += 1
        length = same
    return length if length >= MIN_PREFIX else 0


def prefix_cache(model, prefix: list[int], device):
    """Run ``prefix`` (batch 1) through ``model`` as it is now; its KV cache (the model's own class),
    or None when that cache cannot be repeated over a batch (e.g. linear-attention layers)."""
    import torch

    from abliterate.model.generation import _returned_cache

    ids = torch.tensor([prefix], dtype=torch.long, device=device)  # [1, P]
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
    cache = _returned_cache(out)
    layers = getattr(cache, "layers", None)
    if not layers or not all(hasattr(layer, "batch_repeat_interleave") for layer in layers):
        return None
    return cache


def suffix_inputs(model, cache, suffixes: list[list[int]], prefix_len: int, pad_id: int, device,
                  pad: str = "right") -> dict:
    """Forward kwargs for one batch of suffixes continuing a shared prefix's cache.

    The cache is deep-copied and repeated over the batch (a forward extends it in place). ``pad``:
    ``right`` keeps every real token at its own distance from the prefix (what sliding-window layers
    need: capture reads fixed positions); ``left`` puts the padding between prefix and suffix (masked)
    so that generated tokens can be appended to every row. Positions count real tokens only.
    """
    import copy

    import torch

    from abliterate.model.generation import _cache_argument

    batch, width = len(suffixes), max(len(s) for s in suffixes)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)  # [B, S]
    mask = torch.zeros((batch, prefix_len + width), dtype=torch.long)  # [B, P + S]
    mask[:, :prefix_len] = 1
    positions = torch.full((batch, width), prefix_len, dtype=torch.long)  # [B, S]
    for row, seq in enumerate(suffixes):
        start = 0 if pad == "right" else width - len(seq)
        ids[row, start : start + len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, prefix_len + start : prefix_len + start + len(seq)] = 1
        positions[row, start : start + len(seq)] = torch.arange(prefix_len, prefix_len + len(seq))
    own = copy.deepcopy(cache)
    own.batch_repeat_interleave(batch)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device),
            _cache_argument(model): own, "use_cache": True}


def agreement(plain, shared) -> float:
    """Largest relative difference between two captures ``[L + 1, B, P, H]`` (per captured vector)."""
    import numpy as np

    plain = np.asarray(plain, dtype=np.float64)
    diff = np.linalg.norm(plain - np.asarray(shared, dtype=np.float64), axis=-1)
    scale = np.maximum(np.linalg.norm(plain, axis=-1), np.finfo(np.float32).tiny)
    return float((diff / scale).max())
