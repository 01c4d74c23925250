"""The small metric and plot files DVC shows: layer scores and evaluation metrics.

* ``metrics/layers.json`` (written by score, read by plan and search): flat numbers, the best
  residual index and its scores (:func:`abliterate.scoring.summary`);
* ``plots/layers.csv``: one row per residual index, the columns of :data:`LAYER_COLUMNS`;
* ``metrics/eval.json`` (written by evaluate, read back by ``evaluate --compare``): flat numbers.

All are byte-stable (sorted keys, fixed number formats) so DVC sees no change when nothing changed.
"""

from __future__ import annotations

from pathlib import Path

from abliterate.errors import fail
from abliterate.formats.atomic import write_text
from abliterate.formats.jsonfile import read_json, write_json

LAYER_COLUMNS = ("index", "quality", "cos", "snr", "purity", "rotation", "harmful_norm", "harmless_norm",
                 "direction_norm")  # plots/layers.csv, one row per residual index
EVAL_KEYS = ("refusal_rate_after", "kl_first_token", "kl_answer", "prompts_harmful",
             "prompts_harmless")  # what every evaluate metrics file has (over-refusal needs a borderline set)


def write_scores(metrics: str | Path, plot: str | Path, scores: list[dict], result: dict) -> None:
    """The scores' metrics JSON and per-index CSV, both atomically."""
    lines = [",".join(LAYER_COLUMNS)]
    for row in scores:
        lines.append(",".join(str(row["index"]) if c == "index" else f"{row[c]:.8g}" for c in LAYER_COLUMNS))
    write_text(plot, "\n".join(lines) + "\n")
    write_json(metrics, result)


def read_scores(path: str | Path | None, num_layers: int) -> dict:
    """Score's metrics of a model with ``num_layers`` layers; one line if missing or for another model."""
    score = read_json(path, "scores file", "rerun `dvc repro score`",
                      missing="run `dvc repro score` (needed for auto layers/measurement)")
    best = score.get("best_index") if isinstance(score, dict) else None
    if not isinstance(best, int) or not 0 <= best <= num_layers or score.get("num_layers", num_layers) != num_layers:
        layers = score.get("num_layers") if isinstance(score, dict) else None
        fail(f"{path} is for another model (best index {best}, {layers} layers); rerun score")
    return score


def write_eval_metrics(path: str | Path, metrics: dict) -> None:
    write_json(path, metrics)


def read_eval_metrics(path: str | Path) -> dict:
    """An evaluate metrics file (``--compare``); one line if it is missing or not one."""
    metrics = read_json(path, "comparison metrics", "give a metrics/eval.json saved from another run")
    if not isinstance(metrics, dict) or any(k not in metrics for k in EVAL_KEYS):
        fail(f"{path} is not a metrics file written by evaluate (it lacks {', '.join(EVAL_KEYS)})")
    return metrics
