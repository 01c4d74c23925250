"""Scores of every residual index: how cleanly it separates harmful from harmless prompts.

Per residual index ``i``, from the fp32 means of the directions file, computed in fp64:

* ``cos``: cosine of ``harmful_mean`` and ``harmless_mean``;
* ``snr``: ``|direction| / mean(|harmful_mean|, |harmless_mean|)``;
* ``quality``: ``(1 - cos) * snr``, the ranking used to pick the best index;
* ``purity``: the share of the direction orthogonal to the harmless mean,
  ``|direction - (direction . h) h| / |direction|`` with ``h`` the unit harmless mean (1 = fully
  orthogonal, 0 = parallel);
* ``rotation``: the angle in degrees between the direction at ``i`` and at ``i - 1`` (0 at index
  0 or where a direction is zero): large values mark where the refusal signal is being rewritten;
* ``harmful_norm``, ``harmless_norm``, ``direction_norm``.

The best index is the highest ``quality`` among indices ``i`` with
``min_depth * L <= i <= max_depth * L`` (lowest index on ties).
"""

from __future__ import annotations

import math

from abliterate.errors import fail


def _num_indices(directions: dict) -> int:
    count = 0
    while f"direction.{count}" in directions:
        count += 1
    if count == 0:
        fail("the directions hold no direction.0; rerun the reduce stage")
    return count


def index_scores(directions: dict) -> list[dict]:
    """One dict of scores per residual index (the keys of the module docstring, plus ``index``).

    ``directions`` maps ``harmful_mean.{i}``, ``harmless_mean.{i}``, ``direction.{i}`` to 1-D
    tensors or numpy arrays (as ``reduce`` writes them); everything is computed in fp64.
    """
    import torch

    def norm(v) -> float:
        return float(torch.linalg.vector_norm(v))

    def cosine(a, b) -> float:
        na, nb = norm(a), norm(b)
        return float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0

    scores: list[dict] = []
    previous = None
    for i in range(_num_indices(directions)):
        try:
            harmful = torch.as_tensor(directions[f"harmful_mean.{i}"]).to(torch.float64).flatten()  # [H]
            harmless = torch.as_tensor(directions[f"harmless_mean.{i}"]).to(torch.float64).flatten()  # [H]
            direction = torch.as_tensor(directions[f"direction.{i}"]).to(torch.float64).flatten()  # [H]
        except KeyError as exc:
            fail(f"the directions lack {exc.args[0]}; rerun the reduce stage")
        values = torch.stack([harmful, harmless, direction])
        if not torch.isfinite(values).all():
            fail(f"the directions at residual index {i} are NaN or infinite; capture again with float32")
        h_norm, a_norm, d_norm = norm(harmful), norm(harmless), norm(direction)
        cos = cosine(harmful, harmless)
        mean_norm = (h_norm + a_norm) / 2
        snr = d_norm / mean_norm if mean_norm > 0 else 0.0
        if d_norm > 0 and a_norm > 0:
            axis = harmless / a_norm
            purity = norm(direction - (direction @ axis) * axis) / d_norm
        else:
            purity = 0.0
        rotation = 0.0
        if previous is not None and norm(previous) > 0 and d_norm > 0:
            rotation = math.degrees(math.acos(max(-1.0, min(1.0, cosine(previous, direction)))))
        previous = direction
        scores.append({
            "index": i, "quality": (1.0 - cos) * snr, "cos": cos, "snr": snr, "purity": purity,
            "rotation": rotation, "harmful_norm": h_norm, "harmless_norm": a_norm, "direction_norm": d_norm,
        })
    return scores


def pick_best(scores: list[dict], num_layers: int, min_depth: float, max_depth: float) -> int:
    """The residual index with the highest quality in ``[min_depth * L, max_depth * L]``."""
    if not 0.0 <= min_depth < max_depth <= 1.0:
        fail(f"score depths need 0 <= min-depth < max-depth <= 1, got min-depth {min_depth}, max-depth {max_depth}")
    low, high = min_depth * num_layers, max_depth * num_layers
    eps = 1e-9 * max(1, num_layers)
    candidates = [s for s in scores if low - eps <= s["index"] <= high + eps and math.isfinite(s["quality"])]
    if not candidates:
        fail(f"no residual index lies between {low:g} and {high:g} (L = {num_layers}); widen score.min-depth/max-depth")
    best = max(candidates, key=lambda s: (s["quality"], -s["index"]))
    return int(best["index"])


def rounded(value: float) -> float:
    """Eight significant digits, as the metrics file stores scores."""
    return float(f"{value:.8g}")


def summary(scores: list[dict], best: int, num_layers: int, hidden_size: int) -> dict:
    """The flat metrics of a scoring (``metrics/layers.json``): the best index and its scores."""
    top = scores[best]
    return {
        "best_index": best,
        "best_quality": rounded(top["quality"]),
        "best_cos": rounded(top["cos"]),
        "best_snr": rounded(top["snr"]),
        "best_purity": rounded(top["purity"]),
        "num_layers": num_layers,
        "num_indices": len(scores),
        "hidden_size": hidden_size,
    }
