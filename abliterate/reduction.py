"""Means per residual index and the refusal direction, from two activation files (fp64).

Each prompt vector may first be winsorized: clamped at the given quantile of its own |values|.
With several captured positions every (prompt, position) vector counts as one sample. The unit
direction at index ``i`` is ``normalize(harmful_mean - harmless_mean)``, or with ``orthogonalize``
that difference first made orthogonal to the harmless mean at ``i``; it is all zeros where the
difference is zero (index 0 at the last prompt token is the same template token for every prompt).
"""

from __future__ import annotations

from pathlib import Path

from abliterate.errors import fail


def activation_sums(path: str | Path, winsorize: float = 1.0):
    """fp64 sums per residual index of one activation file: ``(sums [L+1, H], counts [L+1], metadata)``."""
    import numpy as np

    from abliterate.formats.activations import read_activations

    meta, num_layers, hidden, groups = read_activations(path)
    sums = np.zeros((num_layers + 1, hidden), dtype=np.float64)
    counts = np.zeros(num_layers + 1, dtype=np.int64)
    for layers, values in groups:
        if winsorize < 1.0:
            limit = np.quantile(np.abs(values), winsorize, axis=1, keepdims=True)  # [rows, 1]
            values = np.clip(values, -limit, limit)
        for index in np.unique(layers):
            rows = layers == index
            sums[index] += values[rows].sum(axis=0)
            counts[index] += int(rows.sum())
    if counts.min() == 0 or counts.min() != counts.max():
        fail(f"{path} does not hold the same number of vectors at every residual index; rerun capture")
    return sums, counts, meta


def unit_direction(direction, harmless_mean, orthogonalize: bool):
    """The unit direction (fp64 numpy): optionally orthogonal to the harmless mean; zeros if none is left."""
    import numpy as np

    vector = direction.astype(np.float64)
    if orthogonalize and np.linalg.norm(harmless_mean) > 0:
        import torch

        from abliterate.linalg import project_out

        vector = project_out(torch.from_numpy(vector), [torch.from_numpy(harmless_mean.astype(np.float64))]).numpy()
    length = np.linalg.norm(vector)
    if not length > 1e-12 * max(1.0, float(np.linalg.norm(direction))):
        return np.zeros_like(vector)
    return vector / length


def reduce_directions(harmful: Path, harmless: Path, winsorize: float = 1.0, orthogonalize: bool = False):
    """Means, raw and unit directions of two activation files: ``(tensors, metadata)`` as
    :func:`abliterate.formats.directions.save_directions` writes them."""
    import numpy as np

    from abliterate.formats.activations import INDEX_CONVENTION

    if not 0.0 < winsorize <= 1.0:
        fail(f"reduce winsorize must be a quantile in (0, 1] (1.0 = off), got {winsorize}")
    h_sums, h_counts, h_meta = activation_sums(harmful, winsorize)
    a_sums, a_counts, a_meta = activation_sums(harmless, winsorize)
    for key in ("hidden_size", "num_layers", "model_config_sha256", "positions"):
        if h_meta.get(key) != a_meta.get(key):
            fail(
                f"{harmful} and {harmless} differ in {key} ({h_meta.get(key)} vs {a_meta.get(key)}); "
                "capture both prompt sets from the same model with the same settings"
            )
    h_mean = h_sums / h_counts[:, None]  # [L+1, H] fp64
    a_mean = a_sums / a_counts[:, None]
    direction = h_mean - a_mean
    norms = np.linalg.norm(direction, axis=1)
    if not (norms > 0).any():
        fail("harmful and harmless activations are identical at every residual index, so there is no direction; "
             "check that the two prompt files differ")
    tensors: dict = {
        "count.harmful": np.asarray([int(h_counts[0])], dtype=np.int64),
        "count.harmless": np.asarray([int(a_counts[0])], dtype=np.int64),
    }
    for i in range(direction.shape[0]):
        tensors[f"harmful_mean.{i}"] = h_mean[i].astype(np.float32)
        tensors[f"harmless_mean.{i}"] = a_mean[i].astype(np.float32)
        tensors[f"direction.{i}"] = direction[i].astype(np.float32)
        tensors[f"unit.{i}"] = unit_direction(direction[i], a_mean[i], orthogonalize).astype(np.float32)
    metadata = {
        "num_layers": h_meta["num_layers"],
        "hidden_size": h_meta["hidden_size"],
        "num_indices": str(direction.shape[0]),
        "model": h_meta.get("model", ""),
        "model_config_sha256": h_meta.get("model_config_sha256", ""),
        "positions": h_meta.get("positions", ""),
        "orthogonalized": "true" if orthogonalize else "false",
        "winsorize": repr(float(winsorize)),
        "index_convention": h_meta.get("index_convention", INDEX_CONVENTION),
    }
    return tensors, metadata


def reduce(harmful: Path, harmless: Path, out: Path, winsorize: float = 1.0,
           orthogonalize: bool = False) -> tuple[dict, dict[str, str]]:
    """Write the directions file ``out`` from two activation files; return ``(tensors, metadata)``."""
    from abliterate.formats.directions import save_directions

    tensors, metadata = reduce_directions(harmful, harmless, winsorize, orthogonalize)
    save_directions(tensors, metadata, out)
    return tensors, metadata
