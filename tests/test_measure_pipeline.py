"""The measuring half of the pipeline under DVC, in a temporary git repository.

`abliterate use` on a tiny model, `dvc repro score`, then: a no-op repro runs nothing; editing
prompts/harmless.txt reruns capture@harmless, reduce and score but not capture@harmful; editing a
reduce.* key reruns neither capture; the source model folder is never modified; a local remote
shares everything (push, clone, pull: nothing to rerun); a failing `use` changes nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests import tiny
from tests.dvc_project import HARMLESS, dvc, environment, git, make_project, run, set_params, stages_run, write_lines
from tests.dvc_project import stale as _stale

pytestmark = pytest.mark.slow

MEASURING = {"base", "capture@harmful", "capture@harmless", "reduce", "score"}


def stale(root: Path, env: dict) -> dict:
    return _stale(root, env, "score")


def file_state(folder: Path) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mode, p.read_bytes()) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    env = environment(tmp)
    model = tiny.make_model("llama", tmp / "source-model", layers=3)
    root = make_project(tmp, model, env)
    before = file_state(model)
    first = dvc(root, env, "repro", "score")
    return {"root": root, "env": env, "model": model, "tmp": tmp, "first": first, "source_before": before}


def test_repro_then_reruns_only_what_changed(project):
    root, env = project["root"], project["env"]
    assert stages_run(project["first"]) == MEASURING
    metrics = json.loads((root / "metrics" / "layers.json").read_text())
    assert metrics["num_layers"] == 3 and 0 <= metrics["best_index"] <= 3
    assert (root / "plots" / "layers.csv").read_text().startswith("index,quality")
    assert (root / "artifacts" / "activations" / "harmful.parquet").is_file()
    assert stale(root, env) == {}

    # a no-op repro runs nothing
    assert stages_run(dvc(root, env, "repro", "score")) == set()

    # one more harmless prompt: its capture, reduce and score rerun; the harmful capture does not
    write_lines(root / "prompts" / "harmless.txt", HARMLESS + ["Suggest a name for a small orange cat."])
    assert set(stale(root, env)) == {"capture@harmless"}
    assert stages_run(dvc(root, env, "repro", "score")) == {"capture@harmless", "reduce", "score"}

    # a reduce.* key: neither capture reruns
    set_params(root / "params.yaml", **{"reduce.orthogonalize": True})
    assert set(stale(root, env)) == {"reduce"}
    assert stages_run(dvc(root, env, "repro", "score")) == {"reduce", "score"}
    assert stale(root, env) == {}

    # the source folder was linked, never written: same inodes, permissions and bytes
    assert file_state(project["model"]) == project["source_before"]


def test_remote_push_clone_pull(project):
    root, env, tmp = project["root"], project["env"], project["tmp"]
    dvc(root, env, "repro", "score")
    dvc(root, env, "remote", "add", "-d", "store", str(tmp / "remote"))
    git(root, env, "add", "-A")
    git(root, env, "commit", "-qm", "measured")
    dvc(root, env, "push", "--with-deps", "score")
    clone = tmp / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp, env)
    assert not (clone / "artifacts" / "directions.safetensors").exists()
    dvc(clone, env, "pull", "--with-deps", "--allow-missing", "score")  # models/base is not pushed (push: false)
    assert (clone / "artifacts" / "directions.safetensors").read_bytes() == \
        (root / "artifacts" / "directions.safetensors").read_bytes()
    assert not (clone / "models" / "base").exists()
    assert stages_run(dvc(clone, env, "repro", "--allow-missing", "score")) == set()
    assert stages_run(dvc(clone, env, "repro", "score")) == {"base"}  # rebuilt from its source, nothing after it
    assert (clone / "models" / "base" / "config.json").is_file()
    assert stale(clone, env) == {}


def test_use_with_unreachable_hub_changes_nothing(project):
    root, env = project["root"], project["env"]
    dvc(root, env, "repro", "score")
    before = {n: (root / n).read_bytes() for n in ("params.yaml", "model.yaml")}
    result = run([sys.executable, "-m", "stages.use", "nobody-here/no-model"], root, env, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: `dvc repro base` failed")
    assert "could not fetch 'nobody-here/no-model'" in result.stderr
    assert {n: (root / n).read_bytes() for n in before} == before
    # models/base is back and the pipeline is still up to date
    assert (root / "models" / "base" / "config.json").is_file()
    assert stale(root, env) == {}
