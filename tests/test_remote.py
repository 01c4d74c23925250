"""Work split over several machines through a DVC remote: each machine runs some `ablate@<shard>`
stages and pushes them with the run cache; one pulls and finalizes, and gets the same bytes as a
single machine would have written."""

from __future__ import annotations

import pytest
import yaml

import tiny
from dvc_project import dvc, environment, git, make_project, run, stages_run

pytestmark = pytest.mark.slow


def clone(root, target, env):
    run(["git", "clone", "-q", str(root), str(target)], root.parent, env)
    return target


def test_shards_ablated_on_several_machines_equal_one_machine(tmp_path):
    env = environment(tmp_path)
    model = tiny.make_model("llama", tmp_path / "source-model", layers=2)
    root = make_project(tmp_path, model, env, params={"ablate.layers": "0-1"})
    shards = sorted(yaml.safe_load((root / "model.yaml").read_text())["shards"].items())
    assert len(shards) >= 3
    dvc(root, env, "remote", "add", "-d", "store", str(tmp_path / "remote"))
    dvc(root, env, "repro", "plan")  # measurement and plan on the first machine, shared through git and the remote
    git(root, env, "add", "-A")
    git(root, env, "commit", "-qm", "plan")
    dvc(root, env, "push", "-q")

    halves = [shards[: len(shards) // 2], shards[len(shards) // 2:]]
    for i, half in enumerate(halves):
        worker = clone(root, tmp_path / f"worker-{i}", env)
        # --pull: the plan and its inputs come from the remote, models/base from its source
        ran = stages_run(dvc(worker, env, "repro", "--pull", *[f"ablate@{key}" for key, _ in half]))
        assert ran == {"base"} | {f"ablate@{key}" for key, _ in half}  # the base from its source, then its shards
        dvc(worker, env, "push", "-q", "--run-cache")

    last = clone(root, tmp_path / "finisher", env)
    result = dvc(last, env, "repro", "--pull", "finalize")  # every shard from the run cache the workers pushed
    assert stages_run(result) == {"base", "finalize"} | {f"carry@{name}" for name in
                                                          yaml.safe_load((root / "model.yaml").read_text())["files"]}
    assert result.stdout.count("is cached - skipping run") >= len(shards)

    dvc(root, env, "repro", "finalize")  # the same work on one machine
    for folder in (root, last):
        assert not list((folder / "artifacts" / "model").glob(".*.tmp"))
    names = sorted(p.name for p in (root / "artifacts" / "model").iterdir())
    assert names == sorted(p.name for p in (last / "artifacts" / "model").iterdir())
    for name in names:
        assert (last / "artifacts" / "model" / name).read_bytes() == (root / "artifacts" / "model" / name).read_bytes()
