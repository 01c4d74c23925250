"""Hostile and unusual inputs: nothing a model folder or params.yaml holds ever reaches a shell,
unknown or absurd params are one line, and prompts too long for the model are stopped before any
forward pass.

The pipeline test runs `dvc repro` on a tiny model whose folder path holds quotes, spaces, ``$(...)``
and backticks, whose carried files have names that a shell would run or split, with a system prompt
holding an apostrophe: nothing may run, and the result must be right.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tiny
from dvc_project import HARMFUL, REPO, dvc, environment, make_project, run, set_params, stages_run, write_lines
from measure_helpers import error_line

SYSTEM_PROMPT = "You're a helpful assistant."
# names the carry stage copies (tokenizer*, *.py): each would run `touch` or break a shell word
HOSTILE_FILES = {"tokenizer$(touch PWNED2).json": b'{"not": "used"}\n', "tokenizer (1).json": b"{}\n",
                 "helper`touch PWNED4`.py": b"# never imported\n", "tokenizer';touch PWNED5;'.model": b"\x00\x01"}


def _pwned(*roots: Path) -> list[str]:
    return sorted(str(p) for root in roots for p in Path(root).rglob("PWNED*"))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    env = environment(tmp)
    folder = tmp / "it's a \"model\" $(touch PWNED1) `touch PWNED1b` ;touch PWNED1c"
    model = tiny.make_model("qwen2", folder / "model", layers=2)
    for name, data in HOSTILE_FILES.items():
        (model / name).write_bytes(data)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    params = {"evaluate.max-new-tokens": 8, "evaluate.kl-tokens": 4, "ablate.layers": "0-1",
              "capture.system-prompt": SYSTEM_PROMPT}
    root = make_project(tmp, model, env, params=params)
    first = dvc(root, env, "repro")
    return {"root": root, "env": env, "tmp": tmp, "model": model, "before": before, "first": first}


@pytest.mark.slow
def test_repro_with_hostile_names_runs_nothing_and_carries_every_file(hostile):
    root, model = hostile["root"], hostile["model"]
    assert _pwned(hostile["tmp"], REPO) == []
    files = yaml.safe_load((root / "model.yaml").read_text())["files"]
    assert set(HOSTILE_FILES) <= set(files.values())
    assert {f"carry@{key}" for key in files} <= stages_run(hostile["first"])
    for name in files.values():  # byte-identical copies, the base folder untouched
        assert (root / "artifacts" / "model" / name).read_bytes() == (model / name).read_bytes(), name
    assert {p.name: p.read_bytes() for p in model.iterdir()} == hostile["before"]
    assert yaml.safe_load((root / "params.yaml").read_text())["model"]["source"] == str(model)
    run([sys.executable, "-m", "stages.verify", "models/base", "artifacts/model"], root, hostile["env"])


@pytest.mark.slow
def test_the_system_prompt_with_an_apostrophe_reached_capture_and_baseline(hostile):
    from abliterate.formats.activations import read_activations
    from abliterate.formats.baseline_table import read_baseline
    from abliterate.hashing import sha256_text

    root = hostile["root"]
    for name in ("harmful", "harmless"):
        metadata = read_activations(root / "artifacts" / "activations" / f"{name}.parquet")[0]
        assert metadata["system_prompt_sha256"] == sha256_text(SYSTEM_PROMPT)
    assert read_baseline(root / "artifacts" / "baseline.parquet")[1]["system_prompt"] == SYSTEM_PROMPT


@pytest.mark.slow
def test_a_small_prompt_set_is_a_loud_warning(hostile):
    log = hostile["first"].stdout + hostile["first"].stderr
    assert f"warning: prompts/harmful.txt has {len(HARMFUL)} prompt(s), fewer than 16" in log


def _stage_errors(result) -> list[str]:
    """The stage's own ``error:`` lines in a failed `dvc repro` (DVC's own lines start with ERROR)."""
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text
    return [line for line in text.splitlines() if line.startswith("error: ")]


@pytest.mark.slow
@pytest.mark.parametrize("key, value, expected", [
    ("capture.batch-size", "1; touch PWNED3", "capture.batch-size = '1; touch PWNED3' is not a whole number"),
    ("capture.positions", None, "capture.positions must be a single value"),
])
def test_a_bad_param_is_one_line_from_the_stage_and_runs_nothing(hostile, key, value, expected):
    root, env = hostile["root"], hostile["env"]
    saved = (root / "params.yaml").read_text()
    try:
        set_params(root / "params.yaml", **{key: value})
        result = dvc(root, env, "repro", "capture@harmful", check=False)
        assert result.returncode != 0
        errors = _stage_errors(result)
        assert len(errors) == 1 and expected in errors[0], errors
        assert _pwned(hostile["tmp"], REPO) == []
    finally:
        (root / "params.yaml").write_text(saved)


@pytest.mark.slow
def test_a_misspelt_key_is_named_with_the_nearest_known_one(hostile):
    """plan reads the whole ablate section, so DVC runs it and plan names the key. (A key that
    another stage lists by name, such as ablate.scale for search, is reported missing by DVC.)"""
    root, env = hostile["root"], hostile["env"]
    saved = (root / "params.yaml").read_text()
    try:
        (root / "params.yaml").write_text(saved.replace("  layers: ", "  layrs: "))
        result = dvc(root, env, "repro", "plan", check=False)
        assert result.returncode != 0
        errors = _stage_errors(result)
        assert len(errors) == 1 and "unknown key ablate.layrs (did you mean ablate.layers?)" in errors[0], errors
        (root / "params.yaml").write_text(saved.replace("  scale: 2.5 ", "  scael: 3.0 "))
        result = dvc(root, env, "repro", "plan", check=False)  # search lists ablate.scale by name: DVC stops
        assert result.returncode != 0 and "Parameters 'ablate.scale' are missing" in result.stdout + result.stderr
        used = run([sys.executable, "-m", "stages.use", str(hostile["model"])], root, env, check=False)
        assert used.returncode == 2
        assert "unknown key ablate.scael (did you mean ablate.scale?)" in error_line(used.stderr)
        assert "scael" in (root / "params.yaml").read_text()  # nothing was rewritten
    finally:
        (root / "params.yaml").write_text(saved)


@pytest.mark.slow
def test_the_search_refuses_a_prompt_longer_than_the_context(hostile, tmp_path):
    """search renders its validation prompts with the same check, before the model is loaded."""
    from abliterate.errors import UserError
    from abliterate.records import AblationOptions
    from abliterate.search import run_search

    root = hostile["root"]
    harmful = write_lines(tmp_path / "harmful.txt", [*HARMFUL, "x" * 1000])
    harmless = root / "prompts" / "harmless.txt"
    with pytest.raises(UserError, match=rf"{harmful}:{len(HARMFUL) + 1}: this prompt is \d+ tokens rendered, "
                                        r"longer than the model's context \(256 tokens\)"):
        run_search(root / "models" / "base", root / "artifacts" / "directions.safetensors", str(harmful),
                   str(harmless), tmp_path / "search.json", tmp_path / "search.csv", trials=1, validation=4,
                   confirm_prompts=4, kl_budget=1.0, options=AblationOptions(), journal_dir="")


# --- params, without DVC ------------------------------------------------------------------------


def _params(tmp_path: Path, old: str, new: str) -> Path:
    text = (REPO / "params.yaml").read_text()
    assert old in text
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(old, new))
    return path


def _reduce_options(monkeypatch, argv: list[str], capsys) -> dict:
    """The keywords the reduce command passes to the library (the call itself replaced by a recorder)."""
    import abliterate.reduction
    import stages.reduce
    from abliterate.errors import fail
    from stages.cliutil import run_app

    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        fail("recorded")

    monkeypatch.setattr(abliterate.reduction, "reduce", record)
    with pytest.raises(SystemExit):
        run_app(stages.reduce.app, [str(a) for a in argv], stage="stages.reduce")
    assert "error: recorded" in capsys.readouterr().err
    return seen


def test_params_fill_the_options_and_the_command_line_wins(tmp_path, monkeypatch, capsys):
    path = _params(tmp_path, "winsorize: 1.0 ", "winsorize: 0.9 ")
    files = ["--harmful", "a.parquet", "--harmless", "b.parquet", "--out", "d.safetensors"]
    assert _reduce_options(monkeypatch, ["--params", path, *files], capsys) == {"winsorize": 0.9,
                                                                                "orthogonalize": False}
    seen = _reduce_options(monkeypatch, ["--winsorize", "0.7", "--params", path, *files], capsys)
    assert seen["winsorize"] == 0.7


def test_help_names_the_keys_that_params_fills():
    from measure_helpers import run_module

    result = run_module("reduce", "--help", env={"COLUMNS": "300"})
    assert result.returncode == 0 and "--winsorize (reduce.winsorize), --orthogonalize (reduce.orthogonalize)" \
        in " ".join(result.stdout.split())


@pytest.mark.parametrize("old, new, message", [
    ("  scale: 2.5 ", "  scale: .nan ", "ablate.scale is nan; it must be a finite number"),
    ("  scale: 2.5 ", "  scale: 1.0e+6 ", "ablate.scale = 1e+06 is outside [-10, 10]"),
    ("  scale: 2.5 ", "  scale: -.inf ", "ablate.scale is -inf; it must be a finite number"),
    ("  sparsity: 0.0 ", "  sparsity: .nan ", "ablate.sparsity is nan; it must be a finite number"),
    ("  sparsity: 0.0 ", "  sparsity: zero ", "ablate.sparsity = 'zero' is not a number"),
    ("  layers: auto ", "  layrs: auto ", "unknown key ablate.layrs (did you mean ablate.layers?)"),
    ("\nablate:\n", "\nablat:\n", "has no key ablate.layers"),
])
def test_bad_ablate_params_are_one_line_from_plan(tmp_path, old, new, message):
    from measure_helpers import run_module

    path = _params(tmp_path, old, new)
    result = run_module("plan", "--params", path, "--model", "m", "--shards", "s", "--directions", "d", "--out", "o")
    assert result.returncode == 2
    assert message in error_line(result.stderr)


def test_an_unknown_section_is_named_by_use(tmp_path):
    from stages.paramfile import unknown_key_violations

    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["captur"] = {"batch-size": 1}
    assert unknown_key_violations(data) == ["unknown section 'captur' (did you mean 'capture'?)"]


def test_a_scale_out_of_range_by_hand_is_one_line():
    from abliterate.errors import UserError
    from abliterate.layers import resolve_layer_edits

    for scale in (float("nan"), 1e6, -11.0):
        with pytest.raises(UserError, match=r"ablate.scale is .*; it must be a number in \[-10, 10\]"):
            resolve_layer_edits([0], "per-layer", scale, 0.0, [], 2)
    with pytest.raises(UserError, match=r"entry 1 .*: scale is nan"):
        resolve_layer_edits([0], "per-layer", 1.0, 0.0, [{"layer": 0, "scale": float("nan")}], 2)


def test_model_yaml_keys_and_names_are_checked_when_written_and_read(tmp_path):
    from abliterate.errors import UserError
    from abliterate.formats.model_yaml import carried_files, read_files, read_shards, render_model_yaml

    with pytest.raises(UserError, match="files key 'x; touch y' is not of the form"):
        render_model_yaml({"00001": "a.safetensors"}, {"x; touch y": "config.json"})
    with pytest.raises(UserError, match="the file name '../config.json' cannot be carried"):
        render_model_yaml({"00001": "a.safetensors"}, {"config": "../config.json"})
    bad = tmp_path / "model.yaml"
    bad.write_text('shards:\n  "1; touch x": a.safetensors\nfiles:\n  "$(touch y)": config.json\n')
    with pytest.raises(UserError, match="shards key '1; touch x'"):
        read_shards(bad)
    with pytest.raises(UserError, match=r"files key '\$\(touch y\)'"):
        read_files(bad)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer${x}.json").write_text("{}")  # dvc.yaml would read ${x} in its deps as a variable
    with pytest.raises(UserError, match=r"the file name 'tokenizer\$\{x\}.json' cannot be carried"):
        carried_files(folder)


# --- prompt limits --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return tiny.make_model("llama", tmp_path_factory.mktemp("limits") / "model", layers=1)


def test_a_huge_prompt_is_one_line_naming_its_line_before_any_forward_pass(small_model, tmp_path):
    prompts = write_lines(tmp_path / "harmful.txt", [*HARMFUL[:2], "", "a" * 100_000, *HARMFUL[2:]])
    # the stage runs under a small parent that reports the peak RSS of its own children only (this
    # process's RUSAGE_CHILDREN also counts every earlier test's subprocesses)
    parent = ("import resource, subprocess, sys; r = subprocess.run([sys.executable, '-m', 'stages.capture', "
              "*sys.argv[1:]]); print('peak-kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
              "file=sys.stderr); sys.exit(r.returncode)")
    result = subprocess.run([sys.executable, "-c", parent, "--model", str(small_model), "--prompts", str(prompts),
                             "--out", str(tmp_path / "a.parquet")], capture_output=True, text=True,
                            env=dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONPATH=str(REPO)))
    assert result.returncode == 2
    peak = int(result.stderr.split("peak-kib ")[1].split()[0])
    line = error_line(result.stderr)
    assert f"{prompts}:4: this prompt is " in line and "longer than the model's context (256 tokens)" in line
    assert peak < 1_500_000  # KiB: no giant allocation
    assert not (tmp_path / "a.parquet").exists()


def test_max_prompt_tokens_is_one_line(small_model, tmp_path):
    from measure_helpers import run_module

    prompts = write_lines(tmp_path / "p.jsonl", ['{"text": "%s"}' % p for p in HARMFUL])
    result = run_module("capture", "--model", small_model, "--prompts", prompts, "--out", tmp_path / "a.parquet",
                        "--max-prompt-tokens", "40")
    assert result.returncode == 2
    assert f"{prompts}:1: this prompt is " in error_line(result.stderr)
    assert "longer than capture.max-prompt-tokens (40)" in error_line(result.stderr)


def test_baseline_keeps_room_for_the_answer(small_model, tmp_path):
    """An eval prompt that fits the context alone but not with its answer is refused by name."""
    from abliterate.baseline import build_baseline
    from abliterate.errors import UserError

    long = "b" * 200  # about 210 tokens rendered: under 256, over 256 - 64 new tokens
    harmless = write_lines(tmp_path / "harmless.txt", [*HARMFUL[:3], long])
    harmful = write_lines(tmp_path / "harmful.txt", HARMFUL)
    with pytest.raises(UserError, match=rf"{harmless}:4: .*longer than the model's context \(256 tokens less the "
                                        r"64 generated\)"):
        build_baseline(small_model, str(harmful), str(harmless), tmp_path / "b.parquet", max_new_tokens=64,
                       kl_tokens=4, batch_size=4)
    assert not (tmp_path / "b.parquet").exists()


def test_token_limit_is_the_smaller_of_the_setting_and_the_context():
    from abliterate.errors import UserError
    from abliterate.model.prompt_limits import token_limit

    config = {"text_config": {"max_position_embeddings": 512}}
    assert token_limit(config, 4096) == (512, "the model's context (512 tokens)")
    assert token_limit(config, 100) == (100, "capture.max-prompt-tokens (100)")
    assert token_limit(config, 4096, new_tokens=12)[0] == 500
    assert token_limit({}, 4096)[0] == 4096  # no context in the config: the setting alone
    with pytest.raises(UserError, match="512 generated tokens do not fit the model's context of 512 tokens"):
        token_limit(config, 4096, new_tokens=512)
    with pytest.raises(UserError, match="capture.max-prompt-tokens must be a whole number of at least 1"):
        token_limit(config, 0)


def test_locate_names_rows_of_other_formats(tmp_path):
    from abliterate.model.prompt_limits import locate

    path = tmp_path / "p.parquet"
    assert locate(str(path), "x", 6) == f"{path} (prompt 7)"


@pytest.mark.parametrize("name", ["../x.safetensors", "a/b.safetensors", "tokenizer${x}.safetensors", None])
def test_ablate_in_folder_form_takes_only_a_plain_name_from_its_plan(tmp_path, name):
    """DVC's form ``--base models/base --plan P --out artifacts/model``: the shard comes from the plan."""
    import json

    from measure_helpers import run_module

    (tmp_path / "base").mkdir()
    plan = tmp_path / "00001.json"
    plan.write_text(json.dumps({"format": 1, "file": name, "hidden_size": 4, "edits": [], "vectors": {}}))
    result = run_module("ablate", "--base", tmp_path / "base", "--plan", plan, "--out", tmp_path / "out")
    assert result.returncode == 2
    line = error_line(result.stderr)
    assert ("names no shard file" in line) if name is None else (f"the file name {name!r} cannot be carried" in line)
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.safetensors").exists()


def test_carry_by_hand_copies_by_key_and_names_an_unknown_key(tmp_path):
    from abliterate.formats.model_yaml import render_model_yaml
    from measure_helpers import run_module

    base = tmp_path / "base"
    base.mkdir()
    (base / "tokenizer (1).json").write_bytes(b'{"a": 1}')
    model_yaml = tmp_path / "model.yaml"
    model_yaml.write_text(render_model_yaml({"00001": "m.safetensors"}, {"tokenizer-1": "tokenizer (1).json"}))
    argv = ["--files", model_yaml, "--base", base, "--out", tmp_path / "out"]
    assert run_module("carry", "--key", "tokenizer-1", *argv).returncode == 0
    assert (tmp_path / "out" / "tokenizer (1).json").read_bytes() == b'{"a": 1}'
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["tokenizer (1).json"]  # no temporary left
    result = run_module("carry", "--key", "tokenizer", *argv)
    assert result.returncode == 2
    assert "lists no file under the key 'tokenizer' (keys: tokenizer-1)" in error_line(result.stderr)
