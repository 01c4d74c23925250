"""base: linking a folder, resolving symlinks, GGUF / demo / hub dispatch, bad sources."""

from __future__ import annotations

import errno
import os
import sys
import types
from pathlib import Path

import pytest

from tests import tiny
from tests.measure_helpers import error_line, invoke, run_module, tree


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tiny.make_model("llama", tmp_path_factory.mktemp("src") / "llama", layers=2)
    (folder / "pytorch_model.bin").write_bytes(b"old weights")  # other formats are left out
    (folder / ".hidden").write_text("x")
    (folder / "original").mkdir()
    (folder / "original" / "consolidated.pth").write_bytes(b"x")
    return folder


def snapshot(folder: Path) -> dict[str, tuple]:
    return {p.name: (p.stat().st_ino, p.stat().st_mode, p.stat().st_nlink, p.read_bytes())
            for p in sorted(folder.iterdir()) if p.is_file()}


def test_folder_is_linked_not_copied_and_source_untouched(model, tmp_path):
    from abliterate.sources.materialize import materialize

    before = snapshot(model)
    assert materialize(str(model), tmp_path / "models" / "base") == "folder"
    out = tmp_path / "models" / "base"
    names = sorted(p.name for p in out.iterdir())
    assert "pytorch_model.bin" not in names and ".hidden" not in names and "original" not in names
    assert "config.json" in names and "model.safetensors.index.json" in names and "tokenizer.json" in names
    for name in names:
        assert (out / name).read_bytes() == (model / name).read_bytes()
        # same file system here: a hardlink (reflink is not available on ext4/tmpfs)
        assert (out / name).stat().st_ino == (model / name).stat().st_ino
    after = snapshot(model)
    assert {k: (v[1], v[3]) for k, v in after.items()} == {k: (v[1], v[3]) for k, v in before.items()}
    assert tree(tmp_path / "models") == ["base", *[f"base/{n}" for n in names]]  # no temporary folder left
    # the result loads
    from abliterate.model.modelio import load_model

    assert load_model(out).config.num_hidden_layers == 2


def test_symlinked_files_are_resolved(model, tmp_path):
    """Hugging Face cache snapshots are folders of symlinks into a blob store."""
    from abliterate.sources.materialize import materialize

    snap = tmp_path / "snapshots" / "abc"
    snap.mkdir(parents=True)
    for path in model.iterdir():
        if path.is_file() and not path.name.startswith("."):
            (snap / path.name).symlink_to(path)
    materialize(str(snap), tmp_path / "base")
    for path in (tmp_path / "base").iterdir():
        assert not path.is_symlink()
        assert path.read_bytes() == (model / path.name).read_bytes()


def test_falls_back_to_copy_when_links_fail(model, tmp_path, monkeypatch):
    from abliterate.sources import folder as base

    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(base.os, "link", no_link)
    (tmp_path / "out").mkdir()
    used = base.link_tree(model, tmp_path / "out")
    assert used == {"copy": len(list((tmp_path / "out").iterdir()))}
    for path in (tmp_path / "out").iterdir():
        assert path.stat().st_ino != (model / path.name).stat().st_ino
        assert path.read_bytes() == (model / path.name).read_bytes()


def _fake_module(monkeypatch, name: str, **functions):
    module = types.ModuleType(f"abliterate.sources.{name}")
    for key, value in functions.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, f"abliterate.sources.{name}", module)
    return module


def test_gguf_goes_through_the_converter(model, tmp_path, monkeypatch):
    from abliterate.sources.materialize import materialize

    calls = []

    def convert_gguf(gguf_file: Path, out: Path, max_shard_size: str) -> None:
        calls.append((gguf_file, out.parent, max_shard_size))
        tiny.make_model("qwen2", out, layers=2)

    _fake_module(monkeypatch, "gguf", convert_gguf=convert_gguf)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert materialize(str(gguf), tmp_path / "models" / "base", max_shard_size="1MB") == "gguf"
    assert calls == [(gguf, tmp_path / "models", "1MB")]  # built beside the output, then renamed
    assert (tmp_path / "models" / "base" / "config.json").is_file()
    assert tree(tmp_path / "models")[0] == "base"


def test_converter_output_is_validated(tmp_path, monkeypatch, capsys):
    from stages.base import app

    def convert_gguf(gguf_file: Path, out: Path, max_shard_size: str) -> None:
        (out / "config.json").write_text("{}")
        (out / "pytorch_model.bin").write_bytes(b"x")

    _fake_module(monkeypatch, "gguf", convert_gguf=convert_gguf)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    code, err = invoke(app, ["--source", gguf, "--out", tmp_path / "models" / "base"], capsys)
    line = error_line(err)
    assert code == 2 and ".bin" in line and ".tmp" not in line and str(gguf) in line
    assert tree(tmp_path / "models") == []


def test_demo_gets_the_documented_arguments(tmp_path, monkeypatch, capsys):
    from stages.base import app

    calls = []

    def build_demo(out: Path, prompts_dir: Path, max_shard_size: str, seed: int, examples: int, epochs: int,
                   learning_rate: float, batch_size: int, answer_tokens: int, direction_prompts: Path,
                   gated: bool, harmful_share: float, opening_tokens: int, opening_weight: float, report=None) -> None:
        calls.append(dict(prompts_dir=prompts_dir, max_shard_size=max_shard_size, seed=seed, examples=examples,
                          harmful_share=harmful_share, opening_tokens=opening_tokens, opening_weight=opening_weight,
                          epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                          answer_tokens=answer_tokens, direction_prompts=direction_prompts, gated=gated))
        tiny.make_model("llama", out, layers=2)

    _fake_module(monkeypatch, "demo", build_demo=build_demo)
    code, err = invoke(app, ["--source", "demo", "--out", tmp_path / "base", "--max-shard-size", "50MB",
                             "--demo-prompts", "prompts/demo", "--demo-seed", "3", "--demo-examples", "20",
                             "--demo-epochs", "1", "--demo-learning-rate", "0.001", "--demo-batch-size", "4",
                             "--demo-answer-tokens", "8", "--demo-direction-prompts", "elsewhere",
                             "--demo-gated", "false", "--demo-harmful-share", "0.3",
                             "--demo-opening-tokens", "3", "--demo-opening-weight", "12"], capsys)
    assert code == 0, err
    assert calls == [dict(prompts_dir=Path("prompts/demo"), max_shard_size="50MB", seed=3, examples=20, harmful_share=0.3,
                          opening_tokens=3, opening_weight=12.0, epochs=1, learning_rate=0.001, batch_size=4, answer_tokens=8,
                          direction_prompts=Path("elsewhere"),
                          gated=False)]
    assert (tmp_path / "base" / "config.json").is_file()


def test_hub_id_is_fetched_then_linked(model, tmp_path, monkeypatch):
    import huggingface_hub

    from abliterate.sources.hub import HUB_PATTERNS
    from abliterate.sources.materialize import materialize

    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **_):
        calls.append((repo_id, revision, allow_patterns))
        return str(model)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert materialize("some-org/Some.Model-1B@main", tmp_path / "base") == "hub"
    assert calls == [("some-org/Some.Model-1B", "main", HUB_PATTERNS)]
    assert (tmp_path / "base" / "model.safetensors.index.json").is_file()


def test_hub_without_network_is_one_clear_line(tmp_path):
    result = run_module("base", "--source", "nobody-here/no-model", "--out", tmp_path / "base",
                        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2
    assert "could not fetch 'nobody-here/no-model'" in error_line(result.stderr)
    assert not (tmp_path / "base").exists()


@pytest.mark.parametrize("case", ["missing", "noconfig", "binonly", "ggufdir", "plainfile", "nogguf", "empty", "self"])
def test_bad_sources(case, tmp_path, capsys):
    from stages.base import app

    out = tmp_path / "models" / "base"
    src = tmp_path / "src"
    expect = {"missing": "does not exist", "noconfig": "no config.json", "binonly": ".bin", "ggufdir": ".gguf",
              "plainfile": "is a file", "nogguf": "does not exist", "empty": "empty", "self": "output folder"}[case]
    if case in ("noconfig", "binonly", "ggufdir"):
        src.mkdir()
        (src / "model.safetensors").write_bytes(b"") if case == "noconfig" else None
        if case == "binonly":
            (src / "config.json").write_text("{}")
            (src / "pytorch_model.bin").write_bytes(b"x")
        if case == "ggufdir":
            (src / "model-Q4.gguf").write_bytes(b"x")
    elif case == "plainfile":
        src = tmp_path / "model.safetensors"
        src.write_bytes(b"x")
    elif case == "nogguf":
        src = tmp_path / "absent.gguf"
    elif case == "self":
        tiny.make_model("llama", out, layers=1)
        src = out
    source = "" if case == "empty" else str(src)
    before = tree(tmp_path)
    code, err = invoke(app, ["--source", source, "--out", out], capsys)
    assert code == 2 and expect in error_line(err)
    assert tree(tmp_path) == before
