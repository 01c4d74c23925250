"""ablate: write one edited shard (only the planned tensors' bytes change).

The output is a copy of the base shard in which only the byte ranges of the tensors listed in
the shard's plan file are recomputed; the header, every offset and ``__metadata__`` stay
identical, and a shard without edits is a plain byte copy. Memory stays at one chunk of rows
(1 MB in fp32), never a whole tensor or shard: a 2-D writer is read twice (column statistics, then
the edit), every other layout once. The chunk math runs on numpy: no torch import, so a process
per shard starts in a fraction of a second. The output is written under a temporary name and renamed,
and the input is never written to.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

from stages.cliutil import console, direct_options, fail, new_app, option, run_app, run_guarded

FORMAT = 1


def load_plan(path: str | os.PathLike) -> dict:
    """Read one shard plan written by ``plan``; fail clearly if it is missing or not one."""
    path = Path(path)
    if not path.is_file():
        fail(f"plan file {path} does not exist; run `dvc repro plan` first")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        fail(f"plan file {path} is not valid JSON ({exc}); rerun `dvc repro plan`")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "edits" not in doc or "vectors" not in doc:
        fail(f"{path} is not a shard plan of format {FORMAT}; rerun `dvc repro plan`")
    return doc


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True if ``a`` and ``b`` are the same path (after resolving links) or the same file."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _producer(edits: list[dict], vectors: dict):
    """The chunked producer of one tensor's edited bytes (see ``stages.safetensors_io.patch_copy``)."""
    import numpy as np

    from stages.linalg import apply_columns, apply_rows, column_coefficients, column_stats
    from stages.safetensors_io import CHUNK_ELEMENTS, RowReader, as_rows, compute_dtype, row_chunks

    layout = edits[0]["layout"]
    u = np.stack([vectors[e["vector"]] for e in edits], axis=1)  # [hidden, T] fp64

    def columns(fd: int, info, write) -> None:
        cdt = compute_dtype(info.dtype)
        _, cols = as_rows(info)
        uc = u.astype(cdt)
        chunks = list(row_chunks(info, CHUNK_ELEMENTS))
        most = max(end - start for start, end in chunks)
        reader, scratch = RowReader(fd, info, most), np.empty(most * cols, dtype=cdt)
        g = np.zeros((u.shape[1], cols))  # [T, in] fp64
        n2 = np.zeros(cols)  # [in]
        for start, end in chunks:
            part_g, part_n2 = column_stats(reader.read(start, end), uc[start:end], scratch)
            g += part_g
            n2 += part_n2
        b, f = column_coefficients(g, n2, u, [e["scale"] for e in edits], [e["norm_preserve"] for e in edits])
        finite = bool(np.isfinite(n2).all() and np.isfinite(b).all())  # then no NaN can come out
        b, f = b.astype(cdt), f.astype(cdt)
        for start, end in chunks:
            write(apply_columns(reader.read(start, end), uc[start:end], b, f, scratch), start, finite)

    def rows(fd: int, info, write) -> None:
        cdt = compute_dtype(info.dtype)
        chunks = list(row_chunks(info, CHUNK_ELEMENTS))
        reader = RowReader(fd, info, max(end - start for start, end in chunks))
        for start, end in chunks:
            chunk = reader.read(start, end)  # [rows, hidden]
            for t, e in enumerate(edits):
                chunk = apply_rows(chunk, u[:, t].astype(cdt), float(e["scale"]), bool(e["norm_preserve"]))
            write(chunk, start)

    return columns if layout == "columns" else rows


def check(base: Path, plan: dict, out: Path) -> dict[str, list[dict]]:
    """Check the shard, the plan and the output path; return the plan's edits by tensor name.

    Plain Python (no numpy), so that every check is done before the first byte is written and
    before anything slow is imported.
    """
    import math

    from stages.safetensors_io import FLOAT_DTYPES, read_header

    base, out = Path(base), Path(out)
    if not base.is_file():
        fail(f"base shard {base} does not exist; run `dvc repro base` (or check --base)")
    if same_file(base, out):
        fail(f"the output {out} is the input shard itself; write the ablated shard somewhere else (e.g. artifacts/model/)")
    if plan.get("file") not in (None, base.name):
        fail(f"the plan is for shard {plan['file']}, not {base.name}; pass the matching --plan file")
    header = read_header(base)
    hidden = int(plan["hidden_size"])
    for key, values in plan["vectors"].items():
        if not (isinstance(values, list) and len(values) == hidden
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
            fail(f"plan vector {key} is not {hidden} finite values; rerun `dvc repro plan`")
    grouped: dict[str, list[dict]] = {}
    for edit in plan["edits"]:
        grouped.setdefault(edit["tensor"], []).append(edit)
    for name, edits in grouped.items():
        info = header.tensors.get(name)
        if info is None or info.dtype != edits[0]["dtype"] or list(info.shape) != list(edits[0]["shape"]):
            got = "missing" if info is None else f"{info.dtype} {list(info.shape)}"
            fail(f"tensor {name} in {base} is {got}, but the plan expects {edits[0]['dtype']} {edits[0]['shape']}; "
                 "the plan is out of date: rerun `dvc repro plan`")
        if info.dtype not in FLOAT_DTYPES:
            fail(f"tensor {name} is stored as {info.dtype}; editing quantized tensors is not supported yet")
        if len({e["layout"] for e in edits}) != 1:
            fail(f"the plan mixes layouts for tensor {name}; rerun `dvc repro plan`")
        if any(e["vector"] not in plan["vectors"] for e in edits):
            fail(f"an edit of tensor {name} names a vector the plan does not hold; rerun `dvc repro plan`")
    return grouped


def producers(plan: dict, grouped: dict[str, list[dict]]) -> dict:
    """The producers of the edited tensors (see :func:`check` for ``grouped``)."""
    import numpy as np

    vectors = {key: np.asarray(values, dtype=np.float64) for key, values in plan["vectors"].items()}
    return {name: _producer(edits, vectors) for name, edits in grouped.items()}


def ablate_shard(base: Path, plan: dict, out: Path, progress=None) -> int:
    """Write ``out`` = ``base`` with the plan's edits applied; returns the number of tensors edited."""
    from stages.atomic import atomic_path
    from stages.safetensors_io import patch_copy

    grouped = check(base, plan, out)  # every check before the first byte is written
    with atomic_path(out) as tmp:
        # The kernel starts copying the unedited bytes while numpy loads and the producers are built.
        patch_copy(base, tmp, lambda: producers(plan, grouped), progress, names=list(grouped))
    return len(grouped)


def ablate(base: Path, plan_path: Path, out: Path) -> int:
    """Apply one shard's plan, with a progress bar on stderr when it is a terminal."""
    import sys

    plan = load_plan(plan_path)
    if sys.stderr.isatty():
        count = _with_bar(base, plan, out)
    else:  # a log or a queued `dvc exp run`: no bar to draw, and rich's import is skipped
        count = ablate_shard(base, plan, out)
    print(f"ablate: {out} written ({count} tensors edited, the rest copied)", file=sys.stderr)
    return count


def _with_bar(base: Path, plan: dict, out: Path) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("ablate {task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console(), transient=False) as bar:
        task = bar.add_task(Path(base).name, total=Path(base).stat().st_size)
        return ablate_shard(base, plan, out, progress=lambda n: bar.advance(task, n))


def main(
    base: Annotated[Path, option(help="The base shard, e.g. models/base/model-00001-of-00004.safetensors.")],
    plan: Annotated[Path, option(help="Its plan file, e.g. artifacts/plan/00001.json.")],
    out: Annotated[Path, option(help="The edited shard to write (never the base shard itself).")],
) -> None:
    """Write one edited shard: a copy of the base shard with only the planned tensors' bytes rewritten."""
    import gc

    # One matrix-vector product per chunk gains nothing from BLAS threads, whose idle spinning
    # takes the cores the producer and writer threads need (numpy is not imported yet here).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    collecting = gc.isenabled()
    gc.disable()  # the chunk loop makes no reference cycles; full collections only cost time
    try:
        ablate(base, plan, out)
    finally:
        if collecting:  # called in-process (tests, a notebook): leave the collector as it was
            gc.enable()


def __getattr__(name: str):
    """``app``, the typer command, built on first use (DVC's per-shard runs never import typer)."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    app = new_app(__doc__.split("\n")[0])
    app.command()(main)
    globals()["app"] = app
    return app


if __name__ == "__main__":
    # DVC starts this once per shard with the same three options: they are read directly, without
    # typer (its import and start-up are about 0.1 s of a shard's 0.7 s); anything else goes to typer.
    import sys

    given = direct_options(sys.argv[1:], ("--base", "--plan", "--out"))
    if given is None:
        run_app(__getattr__("app"))
    else:
        run_guarded(lambda: main(**{name: Path(value) for name, value in given.items()}))
