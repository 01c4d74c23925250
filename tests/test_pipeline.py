"""The whole pipeline under DVC on a tiny model, in a temporary git repository.

`dvc repro` runs every stage of the pipeline once and the result is a loadable, verified model; a
second repro runs nothing; editing an eval prompt file reruns only baseline and evaluate; an
experiment with another scale reruns only the writing half and shows up in `dvc exp show`; a
local remote shares the whole pipeline but the base model (push, clone, pull: nothing to rerun).
"""

from __future__ import annotations

import json
import sys

import pytest
import yaml

import tiny
from dvc_project import HARMLESS, dvc, environment, git, make_project, run, stages_run, stale, write_lines

pytestmark = pytest.mark.slow

EVAL_KEYS = {"refusal_rate_before", "refusal_rate_after", "over_refusal_rate_before", "over_refusal_rate_after",
             "plain_refusal_rate_before", "plain_refusal_rate_after", "kl_first_token", "kl_first_token_openers",
             "kl_answer"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whole")
    env = environment(tmp)
    model = tiny.make_model("qwen2", tmp / "source-model", layers=3)
    params = {"evaluate.max-new-tokens": 8, "evaluate.kl-tokens": 4, "ablate.layers": "0-2"}
    root = make_project(tmp, model, env, params=params)
    first = dvc(root, env, "repro")
    return {"root": root, "env": env, "tmp": tmp, "first": first}


def _model_yaml(root) -> dict:
    return yaml.safe_load((root / "model.yaml").read_text())


def test_repro_runs_every_stage_once_and_writes_a_verified_model(project):
    root, env = project["root"], project["env"]
    listed = _model_yaml(root)
    expected = {"base", "capture@harmful", "capture@harmless", "reduce", "score", "search", "plan", "finalize",
                "baseline", "evaluate"}
    expected |= {f"ablate@{key}" for key in listed["shards"]} | {f"carry@{key}" for key in listed["files"]}
    assert stages_run(project["first"]) == expected
    assert stale(root, env) == {}
    assert stages_run(dvc(root, env, "repro")) == set()

    metrics = json.loads((root / "metrics" / "eval.json").read_text())
    assert EVAL_KEYS <= set(metrics) and metrics["kl_first_token"] > 0
    assert 0 <= metrics["kl_first_token_openers"] <= metrics["kl_first_token"]
    assert "refusal" in (root / "reports" / "eval.md").read_text().lower()

    # a normal Hugging Face folder that transformers loads, and that verify accepts
    from transformers import AutoModelForCausalLM

    ablated = root / "artifacts" / "model"
    assert AutoModelForCausalLM.from_pretrained(ablated).config.num_hidden_layers == 3
    assert (ablated / "abliteration.json").is_file() and (ablated / "README.md").is_file()
    run([sys.executable, "-m", "stages.verify", "models/base", "artifacts/model"], root, env)


def test_eval_prompt_edit_reruns_only_the_evaluation(project):
    root, env = project["root"], project["env"]
    write_lines(root / "prompts" / "eval" / "harmless.txt", HARMLESS[::-1] + ["Name three colours of the rainbow."])
    assert set(stale(root, env)) == {"baseline"}
    assert stages_run(dvc(root, env, "repro")) == {"baseline", "evaluate"}
    git(root, env, "add", "-A")
    git(root, env, "commit", "-qm", "one more eval prompt")


def test_experiment_reruns_the_writing_half_and_is_listed(project):
    root, env = project["root"], project["env"]
    dvc(root, env, "repro")
    git(root, env, "add", "-A")
    git(root, env, "commit", "-q", "--allow-empty", "-m", "baseline results")
    result = dvc(root, env, "exp", "run", "-n", "half", "-S", "ablate.scale=0.5")
    shards = _model_yaml(root)["shards"]
    ran = stages_run(result)
    assert {"plan", "finalize", "evaluate"} <= ran
    # the skipped search reads the scale too (its first trial); it reruns in a moment, loading nothing
    assert ran - {"search", "plan", "finalize", "evaluate"} <= {f"ablate@{key}" for key in shards}
    assert ran & {f"ablate@{key}" for key in shards}
    shown = json.loads(dvc(root, env, "exp", "show", "--json").stdout)
    half = next(run["revs"][0]["data"] for commit in shown for run in commit.get("experiments") or []
                if run["name"] == "half")
    assert half["params"]["params.yaml"]["data"]["ablate"]["scale"] == 0.5
    assert EVAL_KEYS <= set(half["metrics"]["metrics/eval.json"]["data"])


def test_remote_shares_the_whole_pipeline(project):
    root, env, tmp = project["root"], project["env"], project["tmp"]
    run(["git", "checkout", "-q", "--", "."], root, env)
    dvc(root, env, "checkout", "-q")
    dvc(root, env, "remote", "add", "-d", "store", str(tmp / "remote"))
    git(root, env, "add", "-A")
    git(root, env, "commit", "-qm", "remote")
    dvc(root, env, "push", "-q")
    clone = tmp / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp, env)
    assert dvc(clone, env, "pull", "-q", check=False).returncode != 0  # models/base is not pushed (push: false)
    dvc(clone, env, "pull", "-q", "--allow-missing")
    assert not (clone / "models" / "base").exists()
    for name in ("abliteration.json", *yaml.safe_load((root / "model.yaml").read_text())["shards"].values()):
        assert (clone / "artifacts" / "model" / name).read_bytes() == (root / "artifacts" / "model" / name).read_bytes()
    assert stages_run(dvc(clone, env, "repro", "--allow-missing")) == set()
    assert stages_run(dvc(clone, env, "repro")) == {"base"}  # rebuilt from its source; nothing downstream
    assert stale(clone, env) == {}


def test_a_model_larger_than_the_memory_budget_streams_end_to_end(project, tmp_path):
    """With a memory budget smaller than the model, `dvc repro` streams capture, baseline and evaluate,
    and writes what the in-memory run writes."""
    env = dict(project["env"], ABLITERATE_MEMORY_BUDGET="64kB")
    # the in-memory capture without the shared prefix computes what the streamed one does, bit for bit
    params = {"evaluate.max-new-tokens": 8, "evaluate.kl-tokens": 4, "ablate.layers": "0-2",
              "capture.shared-prefix": False}
    root = make_project(tmp_path, project["tmp"] / "source-model", env, params=params)
    result = dvc(root, env, "repro")
    said = result.stdout + result.stderr
    assert said.count("streamed layer by layer") == 2  # both captures
    assert "baseline: layers read, streamed" in said and "evaluate: layers read, streamed" in said
    run([sys.executable, "-m", "stages.verify", "models/base", "artifacts/model"], root, env)
    names = ("artifacts/directions.safetensors", "artifacts/baseline.parquet", "metrics/eval.json")
    streamed = {name: (root / name).read_bytes() for name in names}
    again = dvc(root, project["env"], "repro", "-f")  # the same project, in memory
    assert "streamed" not in again.stdout + again.stderr
    for name in names:
        assert (root / name).read_bytes() == streamed[name], name
