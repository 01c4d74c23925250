"""score: per-index scores, the best-index pick, metrics JSON and plot CSV."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from tests.measure_helpers import error_line, invoke, tree


def directions_from(harmful: list[list[float]], harmless: list[list[float]]) -> dict:
    import torch

    out = {}
    for i, (h, a) in enumerate(zip(harmful, harmless)):
        out[f"harmful_mean.{i}"] = torch.tensor(h, dtype=torch.float32)
        out[f"harmless_mean.{i}"] = torch.tensor(a, dtype=torch.float32)
        out[f"direction.{i}"] = out[f"harmful_mean.{i}"] - out[f"harmless_mean.{i}"]
    return out


def test_index_scores_by_hand():
    from abliterate.scoring import index_scores

    scores = index_scores(directions_from(
        harmful=[[1.0, 1.0], [2.0, 0.0], [0.0, 3.0]],
        harmless=[[1.0, 1.0], [0.0, 2.0], [4.0, 0.0]],
    ))
    assert [s["index"] for s in scores] == [0, 1, 2]
    # index 0: identical means, no direction
    assert scores[0]["cos"] == pytest.approx(1.0) and scores[0]["quality"] == 0 and scores[0]["direction_norm"] == 0
    # index 1: orthogonal means of norm 2; direction (2, -2)
    s = scores[1]
    assert s["cos"] == pytest.approx(0.0) and s["snr"] == pytest.approx(math.sqrt(8) / 2)
    assert s["quality"] == pytest.approx(math.sqrt(8) / 2)
    assert s["purity"] == pytest.approx(1 / math.sqrt(2))  # (2,-2) against harmless axis (0,1)
    assert s["harmful_norm"] == pytest.approx(2) and s["harmless_norm"] == pytest.approx(2)
    assert s["rotation"] == 0  # the previous direction is zero
    # index 2: direction (-4, 3): rotation from (2,-2)
    t = scores[2]
    expected = math.degrees(math.acos((2 * -4 + -2 * 3) / (math.sqrt(8) * 5)))
    assert t["rotation"] == pytest.approx(expected)
    assert t["snr"] == pytest.approx(5 / 3.5) and t["purity"] == pytest.approx(3 / 5)
    # numpy arrays (as safetensors.numpy loads them) give the same scores
    as_numpy = {k: v.numpy() for k, v in directions_from([[2.0, 0.0]], [[0.0, 2.0]]).items()}
    assert index_scores(as_numpy)[0]["quality"] == pytest.approx(s["quality"])


def test_pick_best_respects_depth_range_and_ties():
    from abliterate.scoring import pick_best

    scores = [{"index": i, "quality": q} for i, q in enumerate([9.0, 1.0, 3.0, 3.0, 2.0, 9.0])]
    assert pick_best(scores, 5, 0.1, 0.9) == 2  # 0 and 5 are outside [0.5, 4.5]; tie 2/3 -> lower
    assert pick_best(scores, 5, 0.0, 1.0) == 0
    assert pick_best(scores, 5, 0.7, 1.0) == 5
    with pytest.raises(Exception, match="min-depth"):
        pick_best(scores, 5, 0.9, 0.2)


def planted(num_layers: int = 6, hidden: int = 16, best: int = 4) -> dict:
    """Means whose separation is largest at index ``best`` (plus noise)."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(num_layers + 1, hidden))
    signal = rng.normal(size=hidden)
    strength = [0.05 * i for i in range(num_layers + 1)]
    strength[best] = 2.0
    harmful = [(base[i] + strength[i] * signal).tolist() for i in range(num_layers + 1)]
    harmless = base.tolist()
    return directions_from(harmful, harmless)


def write_directions(path, directions: dict, num_layers: int) -> None:
    from abliterate.formats.directions import save_directions

    tensors = {k: v.numpy() for k, v in directions.items()}
    tensors.update({f"unit.{i}": tensors[f"direction.{i}"] for i in range(num_layers + 1)})
    hidden = tensors["direction.0"].shape[0]
    save_directions(tensors, {"num_layers": str(num_layers), "hidden_size": str(hidden),
                              "num_indices": str(num_layers + 1)}, path)


def test_score_outputs(tmp_path, capsys):
    from stages.score import app

    write_directions(tmp_path / "d.safetensors", planted(), 6)
    argv = ["--directions", tmp_path / "d.safetensors", "--metrics", tmp_path / "m" / "layers.json",
            "--plot", tmp_path / "p" / "layers.csv"]
    code, err = invoke(app, argv, capsys)
    assert code == 0, err
    assert "quality" in err  # the table goes to stderr
    metrics = json.loads((tmp_path / "m" / "layers.json").read_text())
    assert metrics["best_index"] == 4 and metrics["num_layers"] == 6 and metrics["hidden_size"] == 16
    assert all(isinstance(v, (int, float)) for v in metrics.values())  # flat numbers for dvc metrics
    rows = list(csv.DictReader((tmp_path / "p" / "layers.csv").open()))
    assert [int(r["index"]) for r in rows] == list(range(7))
    assert {"index", "quality", "cos", "snr", "purity", "rotation"} <= set(rows[0])
    assert float(rows[4]["quality"]) == pytest.approx(metrics["best_quality"], rel=1e-6)
    first = [(tmp_path / "m" / "layers.json").read_bytes(), (tmp_path / "p" / "layers.csv").read_bytes()]
    invoke(app, argv, capsys)
    assert first == [(tmp_path / "m" / "layers.json").read_bytes(), (tmp_path / "p" / "layers.csv").read_bytes()]
    # the depth window moves the pick
    invoke(app, [*argv, "--min-depth", "0.0", "--max-depth", "0.5"], capsys)
    assert json.loads((tmp_path / "m" / "layers.json").read_text())["best_index"] == 3


def test_score_bad_input(tmp_path, capsys):
    import torch

    from stages.score import app

    out = ["--metrics", tmp_path / "layers.json", "--plot", tmp_path / "layers.csv"]
    code, err = invoke(app, ["--directions", tmp_path / "none.safetensors", *out], capsys)
    assert code == 2 and "does not exist" in error_line(err)
    write_directions(tmp_path / "d.safetensors", planted(), 6)
    before = tree(tmp_path)
    code, err = invoke(app, ["--directions", tmp_path / "d.safetensors", *out, "--min-depth", "0.8",
                             "--max-depth", "0.3"], capsys)
    assert code == 2 and "min-depth" in error_line(err)
    code, err = invoke(app, ["--directions", tmp_path / "d.safetensors", *out, "--max-depth", "deep"], capsys)
    assert code == 2 and "max-depth" in error_line(err)
    bad = planted()
    bad["harmful_mean.2"] = torch.full_like(bad["harmful_mean.2"], float("nan"))
    write_directions(tmp_path / "nan.safetensors", bad, 6)
    before = tree(tmp_path)
    code, err = invoke(app, ["--directions", tmp_path / "nan.safetensors", *out], capsys)
    assert code == 2 and "NaN" in error_line(err)
    assert tree(tmp_path) == before
