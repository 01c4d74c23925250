"""use: params.yaml edit that keeps comments, model.yaml tables, non-folder sources, bad sources."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import pytest

from tests import tiny
from tests.measure_helpers import REPO, error_line, invoke


@pytest.fixture()
def repo(tmp_path) -> Path:
    """A pipeline folder with the project's dvc.yaml, params.yaml and model.yaml."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml", "model.yaml"):
        shutil.copy(REPO / name, root / name)
    return root


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return tiny.make_model("gemma3", tmp_path_factory.mktemp("m") / "gemma3", layers=2)


def read_yaml(path: Path) -> dict:
    from ruamel.yaml import YAML

    return YAML(typ="safe").load(path.read_text())


def test_folder_source(repo, sharded, capsys, monkeypatch):
    from stages.use import app

    monkeypatch.chdir(repo)
    original = (repo / "params.yaml").read_text()
    code, err = invoke(app, [str(sharded)], capsys)
    assert code == 0, err
    new = (repo / "params.yaml").read_text()
    # exactly one line changed: comments, order and quoting are kept
    changed = [(a, b) for a, b in zip(original.splitlines(), new.splitlines()) if a != b]
    assert len(original.splitlines()) == len(new.splitlines())
    assert changed == [("  source: demo", f"  source: {sharded}")]
    assert read_yaml(repo / "params.yaml")["model"]["source"] == str(sharded)
    text = (repo / "model.yaml").read_text()
    assert text.startswith("# Written by `abliterate use`")
    data = read_yaml(repo / "model.yaml")
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 1
    assert data["shards"] == {f"{i:05d}": name for i, name in enumerate(shards, start=1)}
    assert data["files"] == {
        "chat-template": "chat_template.jinja", "config": "config.json", "generation-config": "generation_config.json",
        "index": "model.safetensors.index.json", "tokenizer": "tokenizer.json", "tokenizer-config": "tokenizer_config.json",
    }


def test_path_inside_repo_is_stored_relative_and_max_shard_size(repo, sharded, monkeypatch, capsys):
    from stages.use import app

    shutil.copytree(sharded, repo / "mymodels" / "g")
    (repo / "sub").mkdir()
    monkeypatch.chdir(repo / "sub")  # the repository is found from a subfolder
    code, err = invoke(app, ["../mymodels/g", "--max-shard-size", "2GB"], capsys)
    assert code == 0, err
    params = read_yaml(repo / "params.yaml")
    assert params["model"]["source"] == "mymodels/g" and params["model"]["max-shard-size"] == "2GB"


def test_single_file_model_and_extra_files(repo, tmp_path, monkeypatch, capsys):
    from stages.use import app

    folder = tiny.make_model("llama", tmp_path / "single", layers=1, max_shard_size="50MB")
    (folder / "tokenizer.model").write_bytes(b"sp")
    (folder / "special_tokens_map.json").write_text("{}")
    (folder / "modeling_custom.py").write_text("# remote code\n")
    (folder / "README.md").write_text("card")
    (folder / "pytorch_model.bin").write_bytes(b"x")
    monkeypatch.chdir(repo)
    code, err = invoke(app, [str(folder)], capsys)
    assert code == 0, err
    data = read_yaml(repo / "model.yaml")
    assert data["shards"] == {"00001": "model.safetensors"}
    assert data["files"]["tokenizer"] == "tokenizer.json"
    assert data["files"]["tokenizer-model"] == "tokenizer.model"
    assert data["files"]["special-tokens-map"] == "special_tokens_map.json"
    assert data["files"]["modeling-custom"] == "modeling_custom.py"
    assert "index" not in data["files"]
    assert "README.md" not in data["files"].values() and "pytorch_model.bin" not in data["files"].values()


def test_file_keys():
    from abliterate.formats.model_yaml import file_key

    assert file_key("config.json") == "config"
    assert file_key("model.safetensors.index.json") == "index"
    assert file_key("tokenizer_config.json") == "tokenizer-config"
    assert file_key("chat_template.jinja") == "chat-template"
    assert file_key("merges.txt") == "merges"


def test_non_folder_source_runs_base_first(repo, tmp_path, monkeypatch, capsys):
    """A GGUF's shard list is known only after `base`: use runs it, then reads models/base."""
    from stages import use
    from abliterate.sources.materialize import materialize

    def convert_gguf(gguf_file, out, max_shard_size):
        tiny.make_model("qwen2", out, layers=2)

    fake = types.ModuleType("abliterate.sources.gguf")
    fake.convert_gguf = convert_gguf
    monkeypatch.setitem(sys.modules, "abliterate.sources.gguf", fake)
    seen = []

    def repro(root: Path) -> None:  # what `dvc repro base` does, in-process
        source = read_yaml(root / "params.yaml")["model"]["source"]
        seen.append(source)
        materialize(str(root / source), root / "models" / "base")

    gguf = repo / "models" / "q.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.chdir(repo)
    result = use.use("models/q.gguf", repro=repro)
    assert seen == ["models/q.gguf"] and result["kind"] == "gguf"
    expected = sorted(p.name for p in (repo / "models" / "base").glob("*.safetensors"))
    assert list(read_yaml(repo / "model.yaml")["shards"].values()) == expected


def test_failed_base_leaves_everything_unchanged(repo, monkeypatch, capsys):
    from stages import use

    before = {n: (repo / n).read_bytes() for n in ("params.yaml", "model.yaml")}

    def repro(root: Path) -> None:
        assert "someone/model" in (root / "params.yaml").read_text()  # base sees the new source
        use.fail("`dvc repro base` failed")

    monkeypatch.chdir(repo)
    with pytest.raises(use.UserError):
        use.use("someone/model", repro=repro, restore=None)
    assert {n: (repo / n).read_bytes() for n in before} == before


@pytest.mark.parametrize("case", ["missing", "noconfig", "binonly", "self", "norepo"])
def test_bad_sources_change_nothing(case, repo, tmp_path, monkeypatch, capsys):
    from stages.use import app

    src = tmp_path / "src"
    expect = {"missing": "does not exist", "noconfig": "no config.json", "binonly": ".bin",
              "self": "own output folder", "norepo": "no dvc.yaml"}[case]
    if case in ("noconfig", "binonly"):
        src.mkdir()
        if case == "binonly":
            (src / "config.json").write_text("{}")
            (src / "pytorch_model.bin").write_bytes(b"x")
    if case == "self":
        src = tiny.make_model("llama", repo / "models" / "base", layers=1)
    monkeypatch.chdir(tmp_path if case == "norepo" else repo)
    before = {n: (repo / n).read_bytes() for n in ("params.yaml", "model.yaml")}
    code, err = invoke(app, [str(src)], capsys)
    assert code == 2 and expect in error_line(err)
    assert {n: (repo / n).read_bytes() for n in before} == before


def test_check_model_yaml_detects_a_stale_shard_list(repo, sharded, tmp_path, monkeypatch, capsys):
    from abliterate.errors import UserError
    from abliterate.formats.model_yaml import check_model_yaml
    from stages.use import use

    monkeypatch.chdir(repo)
    use(str(sharded))
    check_model_yaml(sharded, repo / "model.yaml")  # up to date: no error
    other = tiny.make_model("llama", tmp_path / "single", layers=1, max_shard_size="50MB")
    with pytest.raises(UserError, match="out of date"):
        check_model_yaml(other, repo / "model.yaml")


def _finalize_deps(dvc_yaml: Path) -> list[str]:
    deps = read_yaml(dvc_yaml)["stages"]["finalize"]["deps"]
    return sorted(d for d in deps if d.startswith("artifacts/model/"))


def _model_files(model_yaml: Path) -> list[str]:
    tables = read_yaml(model_yaml)
    return sorted(f"artifacts/model/{name}" for name in [*tables["shards"].values(), *tables["files"].values()])


def test_the_committed_dvc_yaml_lists_every_file_of_the_ablated_folder_under_finalize():
    """So that `dvc repro finalize` builds the whole folder (the ablate@ and carry@ stages)."""
    assert _finalize_deps(REPO / "dvc.yaml") == _model_files(REPO / "model.yaml")


def test_use_rewrites_only_finalizes_file_list_in_dvc_yaml(repo, sharded, capsys, monkeypatch):
    from stages.use import app

    monkeypatch.chdir(repo)
    old = [line for line in (repo / "dvc.yaml").read_text().splitlines() if "- artifacts/model/model-" not in line]
    (repo / "dvc.yaml").write_text("\n".join(old).replace("- artifacts/model/config.json", "- artifacts/model/old.bin"))
    before = (repo / "dvc.yaml").read_text().splitlines()
    code, err = invoke(app, [str(sharded)], capsys)
    assert code == 0, err
    after = (repo / "dvc.yaml").read_text().splitlines()
    assert _finalize_deps(repo / "dvc.yaml") == _model_files(repo / "model.yaml")
    kept = [line for line in before if "artifacts/model/" not in line or "- artifacts/model/" not in line]
    assert [line for line in after if "artifacts/model/" not in line or "- artifacts/model/" not in line] == kept
    (repo / "dvc.yaml").write_text("\n".join(line for line in after if "the rest of the folder" not in line))
    before = {n: (repo / n).read_bytes() for n in ("params.yaml", "model.yaml", "dvc.yaml")}
    code, err = invoke(app, [str(sharded)], capsys)
    assert code == 2 and "lacks the comment line" in error_line(err)
    assert {n: (repo / n).read_bytes() for n in before} == before
