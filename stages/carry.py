"""carry: copy one non-weight file of the base model into the ablated folder, unchanged.

``--key`` is the file's key in model.yaml's ``files`` table (``carry@<key>`` in dvc.yaml); the file
name is read from model.yaml, so no name a model folder controls is ever part of a command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from stages.cliutil import direct_options, lazy_app, option, run_app, run_guarded


def main(
    key: Annotated[str, option(help="The file's key in model.yaml's files table, e.g. tokenizer-config.")],
    files: Annotated[Path, option(help="model.yaml (its files table: key -> file name).")] = Path("model.yaml"),
    base: Annotated[Path, option(help="The base model folder.")] = Path("models/base"),
    out: Annotated[Path, option(help="The ablated model folder.")] = Path("artifacts/model"),
    plan: Annotated[Path, option(help="The plan folder: with ablate.quantized-edits bfloat16, the config and the "
                                      "index take its output changes (none: copied unchanged).")] = None,
) -> None:
    """Copy one non-weight file (config, tokenizer, chat template, index) of the base model."""
    from abliterate.carry import carry

    carry(files, key, base, out, plan)


# ``app``, the typer command, built on first use (DVC's per-file runs never import typer)
__getattr__ = lazy_app(globals(), main)


if __name__ == "__main__":
    # DVC starts this once per file with the same five options: read directly, without typer's start-up
    import sys

    given = direct_options(sys.argv[1:], ("--key", "--files", "--base", "--out", "--plan"))
    if given is None:
        run_app(__getattr__("app"))
    else:
        run_guarded(lambda: main(given.pop("key"), **{name: Path(value) for name, value in given.items()}))
