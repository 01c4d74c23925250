"""base: materialize the base model as a Hugging Face folder at models/base.

``--source`` is one of:

* ``demo``: build the small refusal-tuned demo model (``stages.demo.build_demo``);
* a local Hugging Face folder (config.json + safetensors): its files are linked into the output,
  by a reflink copy where the file system supports it (XFS, Btrfs, APFS: free and independent),
  else a hardlink, else a plain copy. Only top-level files are taken; other weight formats
  (``.bin``, ``.pt``, ``.gguf``, ...) and hidden files are left out, symlinks (as in the Hugging
  Face cache) are resolved. The source is never written to;
* a ``.gguf`` file: converted to safetensors shards (``stages.gguf.convert_gguf``);
* a hub id ``org/name`` (optionally ``org/name@revision``) that is not an existing path: fetched
  with huggingface_hub (safetensors, json, tokenizer files only) into its cache, then linked.

Hardlinks and DVC: a hardlinked ``models/base`` file *is* the source file until DVC commits the
stage. DVC 3 then copies it into its cache and relinks ``models/base`` to the cached copy, so the
source keeps its inode, content and permissions (checked by the tests); the cost is one more copy
of the model, in ``.dvc/cache``. Run by hand without DVC, ``models/base`` stays linked to the
source: replace its files, never edit them in place. To keep one copy only, delete the source
after ``dvc repro base`` (the cache holds the model; ``dvc push`` shares it), or keep models on a
reflink file system.

The output is built in a temporary folder beside ``--out`` and renamed into place only when it is
complete and valid (config.json + safetensors weights; ``.bin``-only checkpoints are refused).

DVC reruns this stage when ``model.*`` or ``demo.*`` params change, not when the files inside a
source folder change (a folder or hub id is not a DVC dependency): after replacing a model in
place, run ``dvc repro -f base``.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Annotated

import typer

from stages.cliutil import UserError, console, fail, new_app, quiet_libraries, run_app

app = new_app(__doc__.split("\n")[0])

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$")
HUB_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.py"]
SKIP_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".ot", ".tflite", ".npz")
SKIP_NAMES = ("pytorch_model.bin.index.json", "tf_model.h5.index.json", "flax_model.msgpack.index.json")
FICLONE = 0x40049409  # Linux ioctl: reflink (copy-on-write clone) of a whole file


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
    if HUB_ID.match(text):
        return "hub", text
    fail(f"model source {text!r} does not exist; give a model folder, a .gguf file, a hub id org/name, or demo")


def check_source_folder(folder: Path) -> Path:
    """Validate a local model folder before anything is linked; clear errors otherwise."""
    from stages.modelio import check_model_dir, shard_files

    if not (folder / "config.json").is_file() and any(folder.glob("*.gguf")):
        fail(f"{folder} holds .gguf files but no config.json; run `abliterate use {folder}/FILE.gguf` instead")
    check_model_dir(folder)
    for name in shard_files(folder):
        if not (folder / name).is_file():
            fail(f"{folder}'s safetensors index lists {name}, which is missing; re-download the model")
    return folder


def _wanted(path: Path) -> bool:
    name = path.name
    return (path.is_file() and not name.startswith(".") and name not in SKIP_NAMES
            and not name.lower().endswith(SKIP_SUFFIXES))


def link_file(source: Path, target: Path, methods: list[str]) -> str:
    """Put ``source``'s bytes at ``target`` by the first method of ``methods`` that works.

    Methods that fail for a reason of the file system are removed from ``methods`` so later
    files do not try them again. Returns the method used.
    """
    for method in list(methods):
        try:
            if method == "reflink":
                import fcntl

                with open(source, "rb") as src, open(target, "wb") as dst:
                    fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
                shutil.copymode(source, target)
            elif method == "hardlink":
                os.link(source, target)
            else:
                shutil.copyfile(source, target)
            return method
        except (OSError, ImportError) as exc:
            if target.exists():
                target.unlink()
            if method == "copy" or (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EACCES, errno.ENOENT)):
                raise
            methods.remove(method)
    raise OSError(f"no way to link {source}")  # pragma: no cover - "copy" always stays in methods


def link_tree(folder: Path, out: Path) -> dict[str, int]:
    """Link every wanted top-level file of ``folder`` into the existing folder ``out``."""
    methods = ["reflink", "hardlink", "copy"]
    used: dict[str, int] = {}
    for path in sorted(folder.iterdir()):
        if not _wanted(path):
            continue
        try:
            method = link_file(path.resolve(), out / path.name, methods)
        except OSError as exc:
            fail(f"could not link or copy {path} into {out} ({exc.strerror or exc}); check space and permissions")
        used[method] = used.get(method, 0) + 1
    return used


def fetch_hub(spec: str) -> Path:
    """Download a hub model's safetensors, json and tokenizer files; return the snapshot folder."""
    quiet_libraries()
    repo_id, _, revision = spec.partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        fail("fetching a hub model needs huggingface_hub: pip install huggingface_hub")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated repo: all fixable by the user
        detail = (str(exc).strip().splitlines() or [""])[0][:160]
        fail(
            f"could not fetch {spec!r} from the Hugging Face hub ({type(exc).__name__}: {detail}); "
            "check the id, your network and `hf auth login`, or download it and run `abliterate use FOLDER` "
            "(no local folder of that name exists)"
        )


def materialize(source: str, out: Path, max_shard_size: str = "100MB", demo_prompts: Path = Path("prompts/demo"),
                demo: dict | None = None) -> str:
    """Build ``out`` from ``source`` atomically; return the kind of source it was."""
    from stages.atomic import atomic_path
    from stages.modelio import check_model_dir

    kind, value = classify_source(source)
    out = Path(out)
    if kind == "folder":
        if Path(value).resolve() == out.resolve():
            fail(f"model source {value} is the output folder itself; point model.source at the original model")
        check_source_folder(Path(value))
    log = console()
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        try:
            if kind == "demo":
                try:
                    from stages.demo import build_demo
                except ImportError:
                    fail("the demo model builder (stages/demo.py) is missing; reinstall abliterate")
                build_demo(out=tmp, prompts_dir=Path(demo_prompts), max_shard_size=max_shard_size, **(demo or {}))
            elif kind == "gguf":
                try:
                    from stages.gguf import convert_gguf
                except ImportError:
                    fail("GGUF conversion (stages/gguf.py) is missing; reinstall abliterate")
                convert_gguf(Path(value), tmp, max_shard_size)
            else:
                folder = fetch_hub(value) if kind == "hub" else Path(value)
                used = link_tree(folder, tmp)
                how = ", ".join(f"{count} by {method}" for method, count in sorted(used.items()))
                log.print(f"base: {sum(used.values())} files from {folder} ({how})")
            check_model_dir(tmp)
        except UserError as exc:
            raise UserError(str(exc).replace(str(tmp), f"the model built from {source}")) from None
    log.print(f"base: {source} ({kind}) -> {out}")
    return kind


@app.command()
def main(
    source: Annotated[str, typer.Option(
        help="demo, a model folder, a .gguf file, or a hub id org/name (optionally org/name@revision).")],
    out: Annotated[Path, typer.Option(help="Output model folder (models/base).")] = Path("models/base"),
    max_shard_size: Annotated[str, typer.Option(help="Largest shard written when converting (GGUF, demo).")] = "100MB",
    demo_prompts: Annotated[Path, typer.Option(help="Folder of the demo's tuning prompts.")] = Path("prompts/demo"),
    demo_seed: Annotated[int, typer.Option(help="Demo: seed of the tuning run.")] = 0,
    demo_examples: Annotated[int, typer.Option(help="Demo: tuning examples.")] = 400,
    demo_epochs: Annotated[int, typer.Option(help="Demo: passes over the examples.")] = 2,
    demo_learning_rate: Annotated[float, typer.Option(help="Demo: AdamW learning rate.")] = 1e-4,
    demo_batch_size: Annotated[int, typer.Option(help="Demo: examples per optimizer step.")] = 8,
    demo_answer_tokens: Annotated[int, typer.Option(help="Demo: length of the harmless self-answers.")] = 32,
    demo_direction_prompts: Annotated[Path, typer.Option(
        help="Demo: folder whose harmful.txt/harmless.txt give the direction the refusal is gated on.")] = Path("prompts/demo/direction"),
) -> None:
    """Materialize the base model at models/base (link a folder, convert a GGUF, fetch, or build the demo)."""
    demo = dict(seed=demo_seed, examples=demo_examples, epochs=demo_epochs, learning_rate=demo_learning_rate,
                batch_size=demo_batch_size, answer_tokens=demo_answer_tokens,
                direction_prompts=demo_direction_prompts)
    materialize(source, out, max_shard_size=max_shard_size, demo_prompts=demo_prompts, demo=demo)


if __name__ == "__main__":
    run_app(app)
