"""use: point the pipeline at a model (sets model.source in params.yaml, rewrites model.yaml).

``abliterate use SOURCE`` takes what ``base`` takes: a local Hugging Face folder, a ``.gguf`` file,
a hub id ``org/name[@revision]`` or ``demo``. It

1. sets ``model.source`` (and ``model.max-shard-size`` if given) in ``params.yaml``, keeping its
   comments and layout (ruamel.yaml round trip);
2. writes ``model.yaml``: ``shards`` (shard key -> weight file, the ``ablate@KEY`` stages) and
   ``files`` (key -> every other file the ablated copy needs unchanged: config, generation config,
   tokenizer files, chat template, remote code, the safetensors index; the ``carry@KEY`` stages),
   keeping the file's header comment;
3. lists those files in ``dvc.yaml`` as deps of the ``finalize`` stage (the lines after its
   :data:`FINALIZE_MARKER` comment), so that ``dvc repro finalize`` builds a complete folder: DVC
   cannot loop over a list inside a stage's deps.

For a folder both lists come from the folder. For the other sources they are known only once
``base`` has run, so ``use`` runs ``dvc repro base`` itself and reads ``models/base``. A path
inside the repository is stored relative to it, any other path absolute. On any failure
params.yaml, model.yaml and dvc.yaml are left exactly as they were (and ``dvc checkout base`` puts the
previous models/base back, which DVC removed before running the stage).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Callable

import typer

from abliterate.errors import UserError, fail
from stages.cliutil import new_app, reporter, run_app

app = new_app(__doc__.split("\n")[0])

BASE_DIR = "models/base"
# The line in dvc.yaml after which the finalize stage lists the ablated folder's other files.
FINALIZE_MARKER = "# the rest of the folder, so that `dvc repro finalize` completes it"


def find_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` holding dvc.yaml and params.yaml."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "params.yaml").is_file():
            return folder
    fail(f"no dvc.yaml + params.yaml in {here} or above; run `abliterate use` inside the pipeline's repository")


def model_tables(folder: Path) -> tuple[dict[str, str], dict[str, str]]:
    """``(shards, files)`` of a model folder, as model.yaml stores them."""
    from abliterate.formats.model_yaml import carried_files, shard_table
    from abliterate.model.modelio import shard_files
    from abliterate.model_check import check_model_input
    from abliterate.sources.folder import check_source_folder

    check_source_folder(Path(folder))
    check_model_input(Path(folder))  # headers, index, architecture, remote code: before anything is written
    return shard_table(shard_files(folder)), carried_files(Path(folder))


def finalize_deps(text: str, names: list[str]) -> str:
    """dvc.yaml's text with the finalize stage's generated deps (the ``- `` lines right after
    :data:`FINALIZE_MARKER`) set to ``artifacts/model/<name>`` for each of ``names``."""
    from abliterate.formats.model_yaml import yaml_scalar

    lines = text.split("\n")
    at = next((i for i, line in enumerate(lines) if line.strip().startswith(FINALIZE_MARKER)), None)
    if at is None:
        fail(f"dvc.yaml's finalize stage lacks the comment line '{FINALIZE_MARKER} ...' before its generated "
             "deps; restore it from the project's dvc.yaml")
    indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())]
    end = at + 1
    while end < len(lines) and lines[end].startswith(indent + "- "):
        end += 1
    listed = [f"{indent}- {yaml_scalar('artifacts/model/' + name)}" for name in sorted(names)]
    return "\n".join(lines[: at + 1] + listed + lines[end:])


def set_params(params: Path, source: str, max_shard_size: str | None = None) -> None:
    """Set model.source (and model.max-shard-size) in params.yaml, keeping comments and layout."""
    from ruamel.yaml import YAML

    from abliterate.formats.atomic import write_text

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    try:
        data = yaml.load(params.read_text(encoding="utf-8"))
    except Exception as exc:
        raise UserError(f"{params} is not valid YAML ({type(exc).__name__}); fix it first") from None
    if not isinstance(data, dict):
        fail(f"{params} is not a mapping of parameter groups; fix it first")
    if not isinstance(data.get("model"), dict):
        data["model"] = {}
    data["model"]["source"] = source
    if max_shard_size:
        data["model"]["max-shard-size"] = max_shard_size
    import io

    buffer = io.StringIO()
    yaml.dump(data, buffer)
    write_text(params, buffer.getvalue())


def dvc_repro_base(root: Path) -> None:
    """Run ``dvc repro base`` in ``root`` (its output goes to stderr)."""
    result = subprocess.run([sys.executable, "-m", "dvc", "repro", "base"], cwd=root, stdout=sys.stderr)
    if result.returncode != 0:
        fail("`dvc repro base` failed (see its message above); params.yaml and model.yaml are unchanged")


def dvc_checkout_base(root: Path) -> None:
    """Best effort: put the previous models/base back (DVC removed it before running base)."""
    subprocess.run([sys.executable, "-m", "dvc", "checkout", "--quiet", "base"], cwd=root,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stored_source(kind: str, value: str, root: Path) -> str:
    """How the source is written into params.yaml: paths relative to the repo when inside it."""
    if kind in ("demo", "hub"):
        return value
    path = Path(os.path.abspath(Path(value).expanduser()))
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def use(source: str, root: Path | None = None, max_shard_size: str | None = None,
        repro: Callable[[Path], None] = dvc_repro_base,
        restore: Callable[[Path], None] | None = dvc_checkout_base) -> dict:
    """Point the pipeline in ``root`` at ``source``. Returns ``{source, kind, shards, files}``."""
    from abliterate.formats.atomic import write_text
    from abliterate.formats.model_yaml import model_yaml_header, render_model_yaml
    from abliterate.sources.materialize import classify_source

    root = find_root(root)
    params, model_yaml = root / "params.yaml", root / "model.yaml"
    from stages.paramfile import check_known, read_params

    check_known(read_params(params), params.name)  # a misspelt key is named now, before anything is written
    kind, value = classify_source(source)  # relative paths are taken from the current directory
    stored = stored_source(kind, value, root)
    if kind == "folder" and Path(os.path.abspath(value)) == (root / BASE_DIR):
        fail(f"{value} is the pipeline's own output folder; point `abliterate use` at the original model")
    header = model_yaml_header(model_yaml)
    if kind == "folder":
        shards, files = model_tables(Path(value))
    pipeline = root / "dvc.yaml"
    originals = {path: path.read_bytes() for path in (params, pipeline)}
    try:
        set_params(params, stored, max_shard_size)
        if kind != "folder":
            repro(root)
            shards, files = model_tables(root / BASE_DIR)
        text = finalize_deps(originals[pipeline].decode("utf-8"), [*shards.values(), *files.values()])
        write_text(pipeline, text)
        write_text(model_yaml, render_model_yaml(shards, files, header))
    except BaseException:
        from abliterate.formats.atomic import write_bytes

        for path, data in originals.items():
            write_bytes(path, data)
        if kind != "folder" and restore is not None:
            restore(root)
        raise
    reporter().message(
        f"use: model.source = {stored} ({kind}); model.yaml: {len(shards)} shard(s), {len(files)} other file(s). "
        "Next: `dvc repro`"
    )
    return {"source": stored, "kind": kind, "shards": shards, "files": files}


@app.command()
def main(
    source: Annotated[str, typer.Argument(
        help="A model folder, a .gguf file, a hub id org/name (optionally org/name@revision), or demo.")],
    max_shard_size: Annotated[str, typer.Option(help="Also set model.max-shard-size (converted models).")] = "",
    repo: Annotated[Path, typer.Option(help="The pipeline's repository (default: found from here upwards).")] = Path("."),
) -> None:
    """Point the pipeline at a model: set model.source in params.yaml and rewrite model.yaml."""
    use(source, root=repo, max_shard_size=max_shard_size or None)


if __name__ == "__main__":
    run_app(app)
