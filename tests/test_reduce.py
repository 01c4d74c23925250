"""reduce (and export-refuse): fp64 means, raw and unit directions, projection, winsorization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests import tiny
from tests.measure_helpers import HARMFUL, HARMLESS, error_line, invoke, run_module, tree, write_lines


@pytest.fixture(scope="module")
def captured(tmp_path_factory) -> dict[str, Path]:
    import torch

    from abliterate.model.capture import capture

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("reduce")
    model = tiny.make_model("qwen2", root / "model", layers=3)
    files = {}
    for name, lines in (("harmful", HARMFUL), ("harmless", HARMLESS)):
        files[name] = root / f"{name}.parquet"
        capture(model, str(write_lines(root / f"{name}.txt", lines)), files[name], batch_size=4, positions="-1,-2")
    other = tiny.make_model("llama", root / "other", layers=2)
    files["other"] = root / "other.parquet"
    capture(other, str(root / "harmless.txt"), files["other"], positions="-1,-2")
    files["model"] = model
    return files


def direct_means(path: Path) -> np.ndarray:
    """fp64 mean per residual index, computed straight from the parquet rows."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    layers = table.column("layer").to_numpy()
    acts = np.stack(table.column("activation").to_pylist()).astype(np.float64)
    return np.stack([acts[layers == i].mean(axis=0) for i in range(layers.max() + 1)])


def load(path: Path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), framework="np") as handle:
        return load_file(str(path)), handle.metadata()


def test_means_and_directions_match_direct_fp64(captured, tmp_path):
    from abliterate.reduction import reduce

    out = tmp_path / "d.safetensors"
    reduce(captured["harmful"], captured["harmless"], out)
    tensors, meta = load(out)
    harmful, harmless = direct_means(captured["harmful"]), direct_means(captured["harmless"])
    assert meta["num_layers"] == "3" and meta["num_indices"] == "4" and meta["hidden_size"] == str(tiny.HIDDEN)
    assert meta["orthogonalized"] == "false" and meta["format"] == "1" and meta["model"] == "Qwen2ForCausalLM" and "index_convention" in meta
    assert int(tensors["count.harmful"].reshape(-1)[0]) == len(HARMFUL) * 2  # prompts x positions
    assert int(tensors["count.harmless"].reshape(-1)[0]) == len(HARMLESS) * 2
    for i in range(4):
        for key in ("harmful_mean", "harmless_mean", "direction", "unit"):
            assert tensors[f"{key}.{i}"].dtype == np.float32 and tensors[f"{key}.{i}"].shape == (tiny.HIDDEN,)
        np.testing.assert_allclose(tensors[f"harmful_mean.{i}"], harmful[i].astype(np.float32), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(tensors[f"harmless_mean.{i}"], harmless[i].astype(np.float32), rtol=1e-6, atol=1e-9)
        raw = harmful[i] - harmless[i]
        np.testing.assert_allclose(tensors[f"direction.{i}"], raw.astype(np.float32), rtol=1e-5, atol=1e-9)
        if np.linalg.norm(raw) > 0:
            np.testing.assert_allclose(tensors[f"unit.{i}"], (raw / np.linalg.norm(raw)).astype(np.float32), atol=1e-6)
    assert np.linalg.norm(tensors["direction.3"]) > 0


def test_orthogonalized_unit_is_orthogonal_to_harmless_mean(captured, tmp_path):
    from abliterate.reduction import reduce

    out = tmp_path / "d.safetensors"
    reduce(captured["harmful"], captured["harmless"], out, orthogonalize=True)
    tensors, meta = load(out)
    assert meta["orthogonalized"] == "true"
    for i in range(1, 4):
        unit, mean = tensors[f"unit.{i}"].astype(np.float64), tensors[f"harmless_mean.{i}"].astype(np.float64)
        assert abs(np.linalg.norm(unit) - 1) < 1e-6
        assert abs(unit @ mean) / np.linalg.norm(mean) < 1e-6
        # it is still the direction, minus its harmless component
        raw = tensors[f"direction.{i}"].astype(np.float64)
        assert unit @ raw > 0


def test_winsorize_clamps_each_vector_at_its_own_quantile(tmp_path):
    from abliterate.formats.activations import ActivationWriter
    from abliterate.reduction import activation_sums

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2, 5, 32)).astype(np.float32)  # [index, prompt, H]
    vectors[1, 2, 3] = 1000.0  # one outlier
    out = tmp_path / "a.parquet"
    with ActivationWriter(out) as writer:
        writer.add(list(range(5)), vectors[:, :, None, :])  # [index, prompt, position, H]
        writer.finish(5, [-1], {"num_layers": "1", "hidden_size": "32"})
    sums, counts, _ = activation_sums(out, winsorize=0.9)
    expected = []
    for i in range(2):
        x = vectors[i].astype(np.float64)
        limit = np.quantile(np.abs(x), 0.9, axis=1, keepdims=True)
        expected.append(np.clip(x, -limit, limit).mean(axis=0))
    np.testing.assert_allclose(sums / counts[:, None], np.stack(expected), rtol=1e-12)
    assert (sums / counts[:, None])[1, 3] < 10  # the outlier no longer dominates


def test_rerun_is_byte_identical_across_processes(captured, tmp_path):
    from abliterate.reduction import reduce

    reduce(captured["harmful"], captured["harmless"], tmp_path / "a.safetensors", winsorize=0.99, orthogonalize=True)
    result = run_module("reduce", "--harmful", captured["harmful"], "--harmless", captured["harmless"],
                        "--out", tmp_path / "b.safetensors", "--winsorize", "0.99", "--orthogonalize", "true")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_export_refuse_layout(captured, tmp_path):
    import torch

    from abliterate.formats.refuse import export_refuse
    from abliterate.reduction import reduce

    reduce(captured["harmful"], captured["harmless"], tmp_path / "d.safetensors", orthogonalize=True)
    export_refuse(tmp_path / "d.safetensors", tmp_path / "m.refuse")
    data = torch.load(tmp_path / "m.refuse")
    tensors, _ = load(tmp_path / "d.safetensors")
    assert data["layers"] == 3
    assert sorted(data) == sorted(["layers"] + [f"{k}_{i}" for k in ("harmful", "harmless", "refuse", "refusenorm")
                                                for i in range(3)])
    for i in range(3):
        assert np.array_equal(data[f"refuse_{i}"].numpy(), tensors[f"direction.{i}"])
        assert np.array_equal(data[f"refusenorm_{i}"].numpy(), tensors[f"unit.{i}"])
        assert np.array_equal(data[f"harmless_{i}"].numpy(), tensors[f"harmless_mean.{i}"])


# ---------------------------------------------------------------- bad input


def _bad(capsys, tmp_path, argv, expect):
    from stages.reduce import app

    before = tree(tmp_path)
    code, err = invoke(app, argv, capsys)
    assert code == 2 and expect in error_line(err)
    assert tree(tmp_path) == before


def test_bad_inputs(captured, tmp_path, capsys):
    out = tmp_path / "d.safetensors"
    ok = ["--harmful", captured["harmful"], "--harmless", captured["harmless"], "--out", out]
    _bad(capsys, tmp_path, ["--harmful", tmp_path / "x.parquet", "--harmless", captured["harmless"], "--out", out],
         "does not exist")
    (tmp_path / "junk.parquet").write_text("not parquet")
    _bad(capsys, tmp_path, ["--harmful", tmp_path / "junk.parquet", "--harmless", captured["harmless"], "--out", out],
         "not a readable parquet")
    # hidden size / model mismatch between the two sets
    _bad(capsys, tmp_path, ["--harmful", captured["harmful"], "--harmless", captured["other"], "--out", out], "differ in")
    # the same set twice: no direction anywhere
    _bad(capsys, tmp_path, ["--harmful", captured["harmless"], "--harmless", captured["harmless"], "--out", out],
         "identical")
    _bad(capsys, tmp_path, [*ok, "--winsorize", "1.5"], "winsorize")
    _bad(capsys, tmp_path, [*ok, "--winsorize", "high"], "winsorize")  # a param of the wrong type
    _bad(capsys, tmp_path, [*ok, "--orthogonalize", "maybe"], "true or false")


def test_export_refuse_bad_input(tmp_path, capsys):
    from stages.export_refuse import app

    code, err = invoke(app, ["--directions", tmp_path / "none.safetensors", "--out", tmp_path / "x.refuse"], capsys)
    assert code == 2 and "does not exist" in error_line(err)
    assert tree(tmp_path) == []


def test_files_of_another_format_version_are_one_line(captured, tmp_path, capsys):
    """A file written by another version of capture or reduce is refused by name, not misread."""
    import pyarrow.parquet as pq
    from safetensors.numpy import load_file, save_file

    table = pq.read_table(captured["harmful"])
    meta = {k: v for k, v in table.schema.metadata.items() if k != b"format"}
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "old.parquet")
    _bad(capsys, tmp_path, ["--harmful", tmp_path / "old.parquet", "--harmless", captured["harmless"],
                            "--out", tmp_path / "d.safetensors"], "not an activation file of format 1")
    from abliterate.reduction import reduce

    reduce(captured["harmful"], captured["harmless"], tmp_path / "d.safetensors")
    _, metadata = load(tmp_path / "d.safetensors")
    save_file(load_file(str(tmp_path / "d.safetensors")), str(tmp_path / "old.safetensors"),
              metadata={k: v for k, v in metadata.items() if k != "format"})
    from stages.score import app

    code, err = invoke(app, ["--directions", tmp_path / "old.safetensors", "--metrics", tmp_path / "m.json",
                             "--plot", tmp_path / "p.csv"], capsys)
    assert code == 2 and "directions file of another version" in error_line(err)
    assert not (tmp_path / "m.json").exists()
