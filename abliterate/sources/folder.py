"""A local Hugging Face folder as a base model: checked, then linked (never copied where avoidable).

Its files are linked into the output, by a reflink copy where the file system supports it (XFS,
Btrfs, APFS: free and independent), else a hardlink, else a plain copy. Only top-level files are
taken; other weight formats (``.bin``, ``.pt``, ``.gguf``, ...) and hidden files are left out,
symlinks (as in the Hugging Face cache) are resolved. The source is never written to.

Hardlinks and DVC: a hardlinked ``models/base`` file *is* the source file until DVC commits the
stage. DVC 3 then copies it into its cache and relinks ``models/base`` to the cached copy, so the
source keeps its inode, content and permissions; the cost is one more copy of the model, in
``.dvc/cache``. Without DVC, ``models/base`` stays linked to the source: replace its files, never
edit them in place.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from abliterate.errors import fail

SKIP_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".ot", ".tflite", ".npz")
SKIP_NAMES = ("pytorch_model.bin.index.json", "tf_model.h5.index.json", "flax_model.msgpack.index.json")
FICLONE = 0x40049409  # Linux ioctl: reflink (copy-on-write clone) of a whole file


def check_source_folder(folder: Path) -> Path:
    """Validate a local model folder before anything is linked; clear errors otherwise."""
    from abliterate.model.modelio import check_model_dir, shard_files
    from abliterate.model_check import check_weights

    if not (folder / "config.json").is_file() and any(folder.glob("*.gguf")):
        fail(f"{folder} holds .gguf files but no config.json; run `abliterate use {folder}/FILE.gguf` instead")
    check_model_dir(folder)
    for name in shard_files(folder):
        if not (folder / name).is_file():
            fail(f"{folder}'s safetensors index lists {name}, which is missing; re-download the model")
    check_weights(folder)  # every shard header and the index, before a corrupt file is linked and cached
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
