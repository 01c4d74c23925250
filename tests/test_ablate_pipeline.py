"""The ablate and finalize stages as commands, and the writing half of the pipeline under DVC.

Fast: ablate refuses to overwrite its input and leaves nothing behind on failure, an unedited
shard is a byte copy, the result does not depend on the chunk size, finalize writes exactly its
two files, byte-stably. Slow (DVC in a temporary git repo, the real dvc.yaml): changing
``ablate.scale`` reruns plan, the shards holding edits and finalize, not the measuring stages;
changing ``ablate.layers`` so that one shard's edits change reruns only that shard's stage.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tiny
from ablation_util import plan_and_ablate
from dvc_project import dvc, environment, make_project, set_params, stages_run
from abliterate.finalize import finalize
from abliterate.formats import safetensors_io
from abliterate.formats.plans import load_shard_plan
from abliterate.shard_edit import ablate_shard
from stages.ablate import app
from stages.cliutil import run_app

MEASURING = {"base", "capture@harmful", "capture@harmless", "reduce", "score"}


@pytest.fixture(scope="module")
def ablated(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate")
    base = tiny.make_model("mixtral", root / "base", layers=2)
    out = plan_and_ablate(base, root, layers="1", measurement="1", targets="experts")
    return root, base, out


def _invoke(argv, capsys):
    capsys.readouterr()
    try:
        run_app(app, [str(a) for a in argv])
        return 0, capsys.readouterr().err
    except SystemExit as exc:
        return exc.code, capsys.readouterr().err


def _keys(root):
    return yaml.safe_load((root / "model.yaml").read_text())["shards"]


def test_input_is_never_the_output(ablated, capsys):
    root, base, _ = ablated
    key, name = next(iter(_keys(root).items()))
    before = (base / name).read_bytes()
    link = root / "link.safetensors"
    link.symlink_to(base / name)
    for target in (base / name, link):
        code, err = _invoke(["--base", base / name, "--plan", root / "plan" / f"{key}.json", "--out", target], capsys)
        assert code == 2 and err.startswith("error: ") and "is the input shard itself" in err
    assert (base / name).read_bytes() == before


def test_failures_leave_no_output(ablated, tmp_path, capsys):
    root, base, _ = ablated
    keys = list(_keys(root).items())
    (k1, n1), (k2, _) = keys[0], keys[1]
    code, err = _invoke(["--base", base / n1, "--plan", root / "plan" / f"{k2}.json", "--out", tmp_path / n1], capsys)
    assert code == 2 and "the plan is for shard" in err
    edited = next(k for k, _ in keys if load_shard_plan(root / "plan" / f"{k}.json").edits)
    stale = json.loads((root / "plan" / f"{edited}.json").read_text())
    stale["edits"][0]["shape"] = [1, 2]
    (tmp_path / "stale.json").write_text(json.dumps(stale))
    name = _keys(root)[edited]
    code, err = _invoke(["--base", base / name, "--plan", tmp_path / "stale.json", "--out", tmp_path / name], capsys)
    assert code == 2 and "rerun `dvc repro plan`" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stale.json"]  # no output, no temporary file
    broken = json.loads((root / "plan" / f"{edited}.json").read_text())
    broken["edits"][0]["vector"] = "missing"
    (tmp_path / "stale.json").write_text(json.dumps(broken))
    code, err = _invoke(["--base", base / name, "--plan", tmp_path / "stale.json", "--out", tmp_path / name], capsys)
    assert code == 2 and "names a vector the plan does not hold" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stale.json"]
    import gc

    assert gc.isenabled()  # the command pauses the garbage collector, and restores it when called in-process


def test_the_command_dvc_runs_matches_the_typer_command(ablated, tmp_path, capsys):
    """``python -m stages.ablate --base B --plan P --out O`` (DVC's form, read without typer) writes
    the same bytes as the typer command; its errors are one line and exit 2; --help is typer's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root, base, out = ablated
    key, name = next((k, n) for k, n in _keys(root).items() if load_shard_plan(root / "plan" / f"{k}.json").edits)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))

    def module(*argv):
        return subprocess.run([sys.executable, "-m", "stages.ablate", *map(str, argv)], env=env,
                              capture_output=True, text=True)

    done = module("--out", tmp_path / name, "--plan", root / "plan" / f"{key}.json", "--base", base / name)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / name).read_bytes() == (out / name).read_bytes()
    failed = module("--base", base / name, "--plan", tmp_path / "missing.json", "--out", tmp_path / "x.safetensors")
    assert failed.returncode == 2 and failed.stderr.strip().splitlines() == [
        f"error: plan file {tmp_path / 'missing.json'} does not exist; run `dvc repro plan` first"]
    partial = module("--base", base / name, "--plan", root / "plan" / f"{key}.json")
    assert partial.returncode == 2 and "Missing option '--out'" in partial.stderr
    assert "Usage" in module("--help").stdout and not (tmp_path / "x.safetensors").exists()


def test_a_terminal_gets_a_progress_bar_and_the_same_bytes(ablated, tmp_path, monkeypatch, capsys):
    import sys

    from stages.ablate import ablate

    root, base, out = ablated
    key, name = next((k, n) for k, n in _keys(root).items() if load_shard_plan(root / "plan" / f"{k}.json").edits)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    capsys.readouterr()
    assert ablate(base / name, root / "plan" / f"{key}.json", tmp_path / name) > 0
    err = capsys.readouterr().err
    assert f"ablate {name}" in err and "tensors edited" in err
    assert (tmp_path / name).read_bytes() == (out / name).read_bytes()


def test_unedited_shards_are_byte_copies_and_chunking_does_not_matter(ablated, tmp_path, monkeypatch):
    root, base, out = ablated
    plans = {name: load_shard_plan(root / "plan" / f"{key}.json") for key, name in _keys(root).items()}
    assert any(not p.edits for p in plans.values()) and any(p.edits for p in plans.values())
    for name, plan in plans.items():
        if not plan.edits:
            assert (out / name).read_bytes() == (base / name).read_bytes()
    monkeypatch.setattr(safetensors_io, "CHUNK_ELEMENTS", 50)  # one or two rows per chunk
    for name, plan in plans.items():
        if plan.edits:
            ablate_shard(base / name, plan, tmp_path / name)
            small, large = load_file(str(tmp_path / name)), load_file(str(out / name))
            for tensor in small:
                assert torch.allclose(small[tensor], large[tensor], rtol=1e-6, atol=1e-7), tensor


def test_finalize_writes_its_two_files_byte_stably(ablated, tmp_path):
    root, base, out = ablated
    before = sorted(p.name for p in out.iterdir())
    doc = finalize(base, root / "plan", root / "directions.safetensors", out)
    first = (out / "abliteration.json").read_bytes(), (out / "README.md").read_bytes()
    finalize(base, root / "plan", root / "directions.safetensors", out)
    assert ((out / "abliteration.json").read_bytes(), (out / "README.md").read_bytes()) == first
    assert sorted(p.name for p in out.iterdir()) == sorted(set(before) | {"abliteration.json", "README.md"})
    assert set(doc["source"]["shards"]) == set(_keys(root).values())
    assert all(len(h) == 64 for h in doc["source"]["shards"].values()) and len(doc["directions"]["sha256"]) == 64
    assert set(doc["plan"]) == set(_keys(root)) and doc["tool"]["name"] == "abliterate"
    card = (out / "README.md").read_text()
    assert "| decoder layers edited | 1 (1 of 2) |" in card and "| targets | experts |" in card


def test_finalize_refuses_the_base_folder_and_a_missing_plan(ablated, tmp_path):
    from abliterate.errors import UserError

    root, base, _ = ablated
    with pytest.raises(UserError, match="is the base model folder"):
        finalize(base, root / "plan", root / "directions.safetensors", base)
    with pytest.raises(UserError, match="run `dvc repro plan` first"):
        finalize(base, tmp_path / "no-plan", root / "directions.safetensors", tmp_path / "out")
    assert not (base / "abliteration.json").exists() and not (tmp_path / "out").exists()


# --- DVC ---------------------------------------------------------------------------------------


def _repro(root, env) -> set[str]:
    return stages_run(dvc(root, env, "repro", "finalize", "ablate", "carry"))


def _set_ablate(root, **values):
    set_params(root / "params.yaml", **{f"ablate.{key}": value for key, value in values.items()})


def _edited_shards(root) -> dict[str, set]:
    shards = yaml.safe_load((root / "model.yaml").read_text())["shards"]
    return {k: {e["tensor"] for e in json.loads((root / "artifacts" / "plan" / f"{k}.json").read_text())["edits"]}
            for k in shards}


@pytest.mark.slow
def test_dvc_reruns_only_what_an_ablate_change_touches(tmp_path):
    env = environment(tmp_path)
    model = tiny.make_model("llama", tmp_path / "source", layers=3)
    root = make_project(tmp_path, model, env, params={"ablate.layers": "1"})

    first = _repro(root, env)
    shards = _edited_shards(root)
    assert MEASURING | {"plan", "finalize"} <= first and {f"ablate@{k}" for k in shards} <= first
    assert _repro(root, env) == set()  # nothing changed: nothing runs

    _set_ablate(root, scale=0.5)
    holding = {f"ablate@{k}" for k, tensors in shards.items() if tensors}
    assert len(holding) == 1 and len(shards) > 1
    skipped = (root / "artifacts" / "search.json").read_bytes()
    # the search reads the scale (its first trial is the configured ablation); skipped, it reruns
    # without loading anything and writes the same bytes
    assert _repro(root, env) == {"search", "plan", "finalize"} | holding
    assert (root / "artifacts" / "search.json").read_bytes() == skipped

    # add layer X whose o_proj lives in another shard than layer 1's: only that shard reruns
    weight_map = json.loads((root / "models" / "base" / "model.safetensors.index.json").read_text())["weight_map"]
    key_of = {name: key for key, name in yaml.safe_load((root / "model.yaml").read_text())["shards"].items()}
    where = {k: key_of[weight_map[f"model.layers.{k}.self_attn.o_proj.weight"]] for k in range(3)}
    other = next((k for k in (0, 2) if where[k] != where[1]), 0)
    _set_ablate(root, layers=f"1,{other}")
    assert _repro(root, env) == {"plan", "finalize", f"ablate@{where[other]}"}
    rows = json.loads((root / "artifacts" / "model" / "abliteration.json").read_text())["settings"]["layers"]
    assert sorted(r["layer"] for r in rows) == sorted({1, other})
    assert (root / "artifacts" / "model" / "config.json").is_file()



@pytest.mark.slow
def test_dvc_repro_finalize_builds_the_whole_folder(tmp_path):
    """finalize depends on every shard and carried file, so it alone builds a complete, loadable model."""
    import sys

    from dvc_project import run

    env = environment(tmp_path)
    model = tiny.make_model("qwen2", tmp_path / "source", layers=2)
    root = make_project(tmp_path, model, env, params={"ablate.layers": "1"})
    ran = stages_run(dvc(root, env, "repro", "finalize"))
    tables = yaml.safe_load((root / "model.yaml").read_text())
    assert {f"ablate@{k}" for k in tables["shards"]} | {f"carry@{k}" for k in tables["files"]} <= ran
    assert not ran & {"baseline", "evaluate"}
    names = sorted([*tables["shards"].values(), *tables["files"].values(), "abliteration.json", "README.md"])
    assert sorted(p.name for p in (root / "artifacts" / "model").iterdir() if p.name != ".gitignore") == names
    run([sys.executable, "-m", "stages.verify", "models/base", "artifacts/model"], root, env)
