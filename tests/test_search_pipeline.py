"""The search stage under DVC on a tiny model: the default repro records that no search ran,
``ablate.layers: search`` without a search fails in plan with one clear line, and
``dvc exp run -S search.trials=N -S ablate.layers=search`` searches, plans the chosen trial and
evaluates it; ablation settings the search does not read leave it alone."""

from __future__ import annotations

import json

import pytest

import tiny
from dvc_project import dvc, environment, git, make_project, set_params, stages_run, stale

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search-pipeline")
    env = environment(tmp)
    model = tiny.make_model("llama", tmp / "source-model", layers=3)
    params = {"evaluate.max-new-tokens": 8, "evaluate.kl-tokens": 4, "search.validation": 4,
              "search.proxy-tokens": 4, "search.confirm-tokens": 8, "search.batch-size": 4, "search.confirm-prompts": 6,
              "search.startup-trials": 3, "search.threads": 1}
    root = make_project(tmp, model, env, params=params)
    first = dvc(root, env, "repro")
    git(root, env, "add", "-A")
    git(root, env, "commit", "-qm", "default pipeline")
    return {"root": root, "env": env, "first": first}


def test_default_repro_runs_no_search(project):
    root = project["root"]
    assert "search" in stages_run(project["first"])
    doc = json.loads((root / "artifacts" / "search.json").read_text())
    assert doc["status"] == "skipped"
    assert "search" not in json.loads((root / "artifacts" / "plan" / "_settings.json").read_text())


def test_layers_search_without_a_search_fails_in_plan(project):
    root, env = project["root"], project["env"]
    set_params(root / "params.yaml", **{"ablate.layers": "search"})
    try:
        result = dvc(root, env, "repro", "plan", check=False)
        assert result.returncode != 0
        assert "error: ablate.layers is search, but no search ran (search.trials is 0); set search.trials" \
            in result.stdout + result.stderr
    finally:
        git(root, env, "checkout", "--", "params.yaml")


def test_experiment_searches_and_plans_the_chosen_trial(project):
    root, env = project["root"], project["env"]
    result = dvc(root, env, "exp", "run", "-n", "searched", "-S", "search.trials=4", "-S", "ablate.layers=search")
    ran = stages_run(result)
    assert {"search", "plan", "finalize", "evaluate"} <= ran
    assert not ran & {"base", "capture@harmful", "capture@harmless", "reduce", "score", "baseline"}
    doc = json.loads((root / "artifacts" / "search.json").read_text())
    assert doc["status"] == "done" and doc["trials_run"] == 4 and doc["chosen"] is not None
    # the confirmed trials were judged on the end of prompts/borderline.txt too (over-refusal)
    assert doc["validation"]["borderline"]["file"] == "prompts/borderline.txt"
    assert doc["base"]["over_refusals"] is not None and doc["chosen"]["over_refusals"] is not None
    settings = json.loads((root / "artifacts" / "plan" / "_settings.json").read_text())
    assert settings["search"]["trial"] == doc["chosen"]["trial"]
    assert settings["layers"] == doc["chosen"]["layers"]
    rows = (root / "plots" / "search.csv").read_text().splitlines()
    assert rows[0] == "trial,refusals,kl,pareto,confirmed,over_refusals" and len(rows) == 5
    metrics = json.loads((root / "metrics" / "eval.json").read_text())
    assert {"heretic_refusals", "heretic_kl_first_token"} <= set(metrics)

    # per-layer overrides are applied by plan on top of the chosen trial: the search does not read them
    set_params(root / "params.yaml", **{"ablate.overrides": [{"layer": 1, "scale": 0.5}]})
    assert set(stale(root, env, "plan")) == {"plan"}
    # measurement, scale and auto-fraction shape the configured ablation, which is the search's first
    # trial and (kl-budget auto) sets its budget
    for key, value in (("ablate.measurement", 1), ("ablate.scale", 0.5), ("ablate.auto-fraction", 0.9)):
        set_params(root / "params.yaml", **{key: value})
        assert set(stale(root, env, "plan")) == {"search", "plan"}
    set_params(root / "params.yaml", **{"search.seed": 1})
    assert set(stale(root, env, "plan")) == {"search", "plan"}
