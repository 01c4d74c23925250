"""Edit one shard: a copy of the base shard with only the planned tensors' bytes recomputed.

The header, every offset and ``__metadata__`` stay identical, and a shard without edits is a plain
byte copy (:func:`abliterate.formats.safetensors_io.patch_copy`). Memory stays at a few chunks of
rows (1 MB in fp32), never a whole tensor or shard: a 2-D writer is read twice (column
statistics, then the edit), every other layout once. The chunk math runs on numpy: no torch
import, so a process per shard starts in a fraction of a second. The output is written under a
temporary name and renamed, and the input is never written to. Targets stored quantized (FP8,
MXFP4, NVFP4) are copied with the rest, then rewritten in their own format
(:mod:`abliterate.quant.rewrite`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from abliterate.records import Edit
from abliterate.errors import fail
from abliterate.formats.atomic import same_file
from abliterate.formats.plans import ShardPlan


def producer(edits: list[Edit], vectors: Callable[[object], object] | None = None):
    """The chunked producer of one tensor's edited bytes (see :func:`abliterate.formats.safetensors_io.patch_copy`).

    ``edits``: the tensor's edits in application order (one layout); ``vectors(values)``: turns an
    edit's vector into a fp64 numpy array (a cache shared by a shard's producers), default ``np.asarray``.
    """
    import numpy as np

    from abliterate.formats.safetensors_io import CHUNK_ELEMENTS, RowReader, as_rows, compute_dtype, row_chunks
    from abliterate.linalg import apply_columns, apply_rows, column_coefficients, column_stats

    as_array = vectors or (lambda values: np.asarray(values, dtype=np.float64))
    layout = edits[0].layout
    u = np.stack([as_array(e.vector) for e in edits], axis=1)  # [hidden, T] fp64

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
        if not np.isfinite(n2).all():  # a NaN/Inf would be spread over its whole column
            nonfinite(info.name)
        b, f = column_coefficients(g, n2, u, [e.scale for e in edits], [e.norm_preserve for e in edits])
        finite = bool(np.isfinite(b).all())  # then no NaN can come out
        b, f = b.astype(cdt), f.astype(cdt)
        for start, end in chunks:
            write(apply_columns(reader.read(start, end), uc[start:end], b, f, scratch), start, finite)

    def rows(fd: int, info, write) -> None:
        cdt = compute_dtype(info.dtype)
        chunks = list(row_chunks(info, CHUNK_ELEMENTS))
        reader = RowReader(fd, info, max(end - start for start, end in chunks))
        for start, end in chunks:
            chunk = reader.read(start, end)  # [rows, hidden]
            if not np.isfinite(chunk).all():
                nonfinite(info.name)
            for t, e in enumerate(edits):
                chunk = apply_rows(chunk, u[:, t].astype(cdt), float(e.scale), bool(e.norm_preserve))
            write(chunk, start)

    return columns if layout == "columns" else rows


def nonfinite(name: str) -> NoReturn:
    """The one-line error of an edited tensor that holds NaN or infinite values (from a producer thread)."""
    fail(f"tensor {name} of the base model holds NaN or infinite values; the edit would spread them over "
         "whole columns (rows): the checkpoint is damaged, re-download it (or leave this tensor's layer out of "
         "ablate.layers)")


def check(base: Path, plan: ShardPlan, out: Path | None) -> dict[str, list[Edit]]:
    """Check the shard, the plan and the output path (None: nothing is written, as in verify, where
    an unedited shard may be the very file DVC linked from its cache); return the edits by tensor name.

    Plain Python (no numpy), so that every check is done before the first byte is written and
    before anything slow is imported.
    """
    from abliterate.formats.safetensors_io import FLOAT_DTYPES, read_header

    base = Path(base)
    if not base.is_file():
        fail(f"base shard {base} does not exist; run `dvc repro base` (or check --base)")
    if out is not None and same_file(base, Path(out)):
        fail(f"the output {out} is the input shard itself; write the ablated shard somewhere else (e.g. artifacts/model/)")
    if plan.file not in (None, base.name):
        fail(f"the plan is for shard {plan.file}, not {base.name}; pass the matching --plan file")
    header = read_header(base)
    grouped = plan.by_tensor()
    for name, edits in grouped.items():
        if edits[0].storage is not None:  # stored quantized: its own checks (abliterate.quant.rewrite)
            from abliterate.quant.rewrite import check_stored

            check_stored(header, name, edits)
            continue
        info = header.tensors.get(name)
        if info is None or info.dtype != edits[0].dtype or tuple(info.shape) != tuple(edits[0].shape):
            got = "missing" if info is None else f"{info.dtype} {list(info.shape)}"
            fail(f"tensor {name} in {base} is {got}, but the plan expects {edits[0].dtype} {list(edits[0].shape)}; "
                 "the plan is out of date: rerun `dvc repro plan`")
        if info.dtype not in FLOAT_DTYPES:
            fail(f"tensor {name} is stored as {info.dtype}; editing quantized tensors is not supported yet")
        if len({e.layout for e in edits}) != 1:
            fail(f"the plan mixes layouts for tensor {name}; rerun `dvc repro plan`")
    if "expand" in plan.doc:  # ablate.quantized-edits: bfloat16 (abliterate.quant.expand)
        from abliterate.quant.expand import check_expand

        check_expand(header, plan.doc["expand"])
    return grouped


def producers(grouped: dict[str, list[Edit]]) -> dict:
    """The producers of the edited tensors (see :func:`check` for ``grouped``); each distinct
    vector of the plan is turned into a numpy array once."""
    import numpy as np

    arrays: dict[int, object] = {}

    def as_array(values):
        key = id(values)
        if key not in arrays:
            arrays[key] = np.asarray(values, dtype=np.float64)
        return arrays[key]

    return {name: producer(edits, as_array) for name, edits in grouped.items()}


def ablate_shard(base: Path, plan: ShardPlan, out: Path, progress: Callable[[int], None] | None = None) -> int:
    """Write ``out`` = ``base`` with the plan's edits applied; returns the number of tensors edited."""
    from abliterate.formats.atomic import atomic_path, remove_stale
    from abliterate.formats.safetensors_io import patch_copy

    grouped = check(base, plan, out)  # every check before the first byte is written
    plain = {name: edits for name, edits in grouped.items() if edits[0].storage is None}
    remove_stale(out)  # the temporary file of a killed run (full size: a shard's worth of disk)
    expand = plan.doc.get("expand") or []
    if expand or any(edits[0].storage and edits[0].storage.get("output") for edits in grouped.values()):
        from abliterate.quant.expand import write_shard

        with atomic_path(out) as tmp:  # a new header: quantized tensors written as bfloat16
            write_shard(base, tmp, grouped, expand, producers(plain), progress)
        return len(grouped)
    with atomic_path(out) as tmp:  # removed on every exit: error, Ctrl-C, SIGTERM (the stage makes it raise)
        # The kernel starts copying the unedited bytes while numpy loads and the producers are built.
        patch_copy(base, tmp, lambda: producers(plain), progress, names=list(plain))
        if len(plain) < len(grouped):  # quantized tensors: copied above, now rewritten with their scales
            from abliterate.quant.rewrite import rewrite_quantized

            rewrite_quantized(base, tmp, {n: e for n, e in grouped.items() if n not in plain})
    return len(grouped)
