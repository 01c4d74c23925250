"""use: point the pipeline at a model (sets model.source in params.yaml, rewrites model.yaml).

``abliterate use SOURCE`` takes what ``base`` takes: a local Hugging Face folder, a ``.gguf`` file,
a hub id ``org/name[@revision]`` or ``demo``. It

1. sets ``model.source`` (and ``model.max-shard-size`` if given) in ``params.yaml``, keeping its
   comments and layout (ruamel.yaml round trip);
2. writes ``model.yaml``: ``shards`` (shard key -> weight file, the ``ablate@KEY`` stages) and
   ``files`` (key -> every other file the ablated copy needs unchanged: config, generation config,
   tokenizer files, chat template, remote code, the safetensors index; the ``carry@KEY`` stages),
   keeping the file's header comment.

For a folder both lists come from the folder. For the other sources they are known only once
``base`` has run, so ``use`` runs ``dvc repro base`` itself and reads ``models/base``. A path
inside the repository is stored relative to it, any other path absolute. On any failure
params.yaml and model.yaml are left exactly as they were (and ``dvc checkout base`` puts the
previous models/base back, which DVC removed before running the stage).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Callable

import typer

from stages.cliutil import UserError, console, fail, new_app, run_app

app = new_app(__doc__.split("\n")[0])

BASE_DIR = "models/base"
DEFAULT_HEADER = (
    "# Written by `abliterate use`: the base model's weight shards and the other files of its folder.\n"
    "# Keys name the per-shard stages (ablate@00001, carry@config). Do not edit by hand.\n"
)
CARRY_NAMES = {
    "config.json", "generation_config.json", "model.safetensors.index.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.json", "processor_config.json",
    "preprocessor_config.json", "video_preprocessor_config.json", "spiece.model",
}
CARRY_PATTERNS = (re.compile(r"^tokenizer.*"), re.compile(r".*\.(py|jinja|tiktoken)$"),
                  re.compile(r"^sentencepiece.*\.model$"), re.compile(r".*preprocessor_config\.json$"))
YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def find_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` holding dvc.yaml and params.yaml."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "params.yaml").is_file():
            return folder
    fail(f"no dvc.yaml + params.yaml in {here} or above; run `abliterate use` inside the pipeline's repository")


def file_key(name: str) -> str:
    """model.yaml key of a carried file: name without extension, lower case, other chars as '-'."""
    if name == "model.safetensors.index.json":
        return "index"
    stem = name.rsplit(".", 1)[0] if "." in name.strip(".") else name
    return re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-") or "file"


def carried_files(folder: Path) -> dict[str, str]:
    """key -> file name for every non-weight file of ``folder`` the ablated copy keeps unchanged."""
    names = sorted(
        p.name for p in Path(folder).iterdir()
        if p.is_file() and not p.name.startswith(".")
        and (p.name in CARRY_NAMES or any(rx.match(p.name) for rx in CARRY_PATTERNS))
    )
    keys: dict[str, str] = {}
    # .json files claim the short key first (tokenizer.json -> tokenizer, tokenizer.model -> tokenizer-model)
    for name in sorted(names, key=lambda n: (not n.endswith(".json"), n)):
        key = file_key(name)
        if key in keys:
            key = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        keys[key] = name
    return dict(sorted(keys.items()))


def model_tables(folder: Path) -> tuple[dict[str, str], dict[str, str]]:
    """``(shards, files)`` of a model folder, as model.yaml stores them."""
    from stages.base import check_source_folder
    from stages.modelio import shard_files, shard_table

    check_source_folder(Path(folder))
    return shard_table(shard_files(folder)), carried_files(Path(folder))


def _scalar(text: str) -> str:
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9._-]*", text) and text.lower() not in YAML_WORDS:
        return text
    return json.dumps(text)


def render_model_yaml(shards: dict[str, str], files: dict[str, str], header: str = DEFAULT_HEADER) -> str:
    lines = [header.rstrip("\n"), "shards:"]
    lines += [f"  {json.dumps(k)}: {_scalar(v)}" for k, v in sorted(shards.items())]
    lines.append("files:" if files else "files: {}")
    lines += [f"  {_scalar(k)}: {_scalar(v)}" for k, v in sorted(files.items())]
    return "\n".join(lines) + "\n"


def model_yaml_header(path: Path) -> str:
    """The leading comment block of an existing model.yaml (or the default one)."""
    if not path.is_file():
        return DEFAULT_HEADER
    header = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    return "\n".join(header) + "\n" if header else DEFAULT_HEADER


def check_model_yaml(model_dir: str | Path, model_yaml: str | Path) -> None:
    """Fail clearly if model.yaml's shard list no longer matches the model folder's weights."""
    from ruamel.yaml import YAML

    from stages.modelio import shard_files, shard_table

    try:
        listed = dict((YAML(typ="safe").load(Path(model_yaml).read_text(encoding="utf-8")) or {}).get("shards") or {})
    except Exception as exc:  # missing or malformed file
        raise UserError(f"{model_yaml} cannot be read ({type(exc).__name__}); run `abliterate use SOURCE` again") from None
    actual = shard_table(shard_files(model_dir))
    if {str(k): v for k, v in listed.items()} != actual:
        fail(f"{model_yaml} lists shards {sorted(listed.values())} but {model_dir} has {sorted(actual.values())}; "
             "run `abliterate use SOURCE` again (model.yaml is out of date)")


def set_params(params: Path, source: str, max_shard_size: str | None = None) -> None:
    """Set model.source (and model.max-shard-size) in params.yaml, keeping comments and layout."""
    from ruamel.yaml import YAML

    from stages.atomic import write_text

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
    from stages.atomic import write_text
    from stages.base import classify_source

    root = find_root(root)
    params, model_yaml = root / "params.yaml", root / "model.yaml"
    kind, value = classify_source(source)  # relative paths are taken from the current directory
    stored = stored_source(kind, value, root)
    if kind == "folder" and Path(os.path.abspath(value)) == (root / BASE_DIR):
        fail(f"{value} is the pipeline's own output folder; point `abliterate use` at the original model")
    header = model_yaml_header(model_yaml)
    if kind == "folder":
        shards, files = model_tables(Path(value))
    original = params.read_bytes()
    try:
        set_params(params, stored, max_shard_size)
        if kind != "folder":
            repro(root)
            shards, files = model_tables(root / BASE_DIR)
        write_text(model_yaml, render_model_yaml(shards, files, header))
    except BaseException:
        from stages.atomic import write_bytes

        write_bytes(params, original)
        if kind != "folder" and restore is not None:
            restore(root)
        raise
    console().print(
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
