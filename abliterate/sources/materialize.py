"""Materialize a base model as a Hugging Face folder, whatever its source.

A source is one of: ``demo`` (build the small refusal-tuned demo model, :mod:`abliterate.sources.demo`);
a local Hugging Face folder (config.json + safetensors; linked, :mod:`abliterate.sources.folder`);
a ``.gguf`` file (converted to safetensors shards, :mod:`abliterate.sources.gguf`); a hub id
``org/name`` (optionally ``org/name@revision``) that is not an existing path (fetched,
:mod:`abliterate.sources.hub`, then linked). The output is built in a temporary folder beside it
and renamed into place only when it is complete and valid (config.json + safetensors weights;
``.bin``-only checkpoints are refused).
"""

from __future__ import annotations

from pathlib import Path

from abliterate.errors import UserError, fail
from abliterate.progress import PLAIN, Reporter
from abliterate.sources.folder import check_source_folder, link_tree


def classify_source(source: str) -> tuple[str, str]:
    """``(kind, value)`` with kind ``demo``, ``folder``, ``gguf`` or ``hub``; fail if it is none."""
    text = str(source).strip()
    if not text:
        fail("model.source is empty; set it with `abliterate use SOURCE` (a folder, a .gguf file, org/name or demo)")
    if text == "demo":
        return "demo", text
    path = Path(text).expanduser()
    if path.is_dir():
        return "folder", str(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", str(path)
        fail(f"model source {path} is a file; give its folder (config.json + *.safetensors), a .gguf file, org/name or demo")
    if text.lower().endswith(".gguf"):
        fail(f"GGUF file {path} does not exist; check the path")
    from abliterate.sources.hub import HUB_ID

    if HUB_ID.match(text):
        return "hub", text
    fail(f"model source {text!r} does not exist; give a model folder, a .gguf file, a hub id org/name, or demo")


def materialize(source: str, out: Path, max_shard_size: str = "100MB", demo_prompts: Path = Path("prompts/demo"),
                demo: dict | None = None, report: Reporter = PLAIN) -> str:
    """Build ``out`` from ``source`` atomically; return the kind of source it was."""
    from abliterate.formats.atomic import atomic_path
    from abliterate.model.modelio import check_model_dir

    kind, value = classify_source(source)
    out = Path(out)
    if kind == "folder":
        if Path(value).resolve() == out.resolve():
            fail(f"model source {value} is the output folder itself; point model.source at the original model")
        check_source_folder(Path(value))
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        try:
            if kind == "demo":
                try:
                    from abliterate.sources.demo import build_demo
                except ImportError:
                    fail("the demo model builder (abliterate/sources/demo.py) is missing; reinstall abliterate")
                build_demo(out=tmp, prompts_dir=Path(demo_prompts), max_shard_size=max_shard_size, report=report,
                           **(demo or {}))
            elif kind == "gguf":
                try:
                    from abliterate.sources.gguf import convert_gguf
                except ImportError:
                    fail("GGUF conversion (abliterate/sources/gguf.py) is missing; reinstall abliterate")
                convert_gguf(Path(value), tmp, max_shard_size)
            else:
                from abliterate.sources.hub import fetch_hub

                folder = fetch_hub(value) if kind == "hub" else Path(value)
                used = link_tree(folder, tmp)
                how = ", ".join(f"{count} by {method}" for method, count in sorted(used.items()))
                report.message(f"base: {sum(used.values())} files from {folder} ({how})")
            check_model_dir(tmp)
        except UserError as exc:
            raise UserError(str(exc).replace(str(tmp), f"the model built from {source}")) from None
    report.message(f"base: {source} ({kind}) -> {out}")
    return kind
