"""Edit a shard's quantized tensors in their own format (the ablate stage's second pass).

The shard has already been copied byte for byte (:func:`abliterate.shard_edit.ablate_shard`);
for each planned tensor stored quantized this module reads it (one tensor, or one expert of a
fused MXFP4 tensor, at a time), de-quantizes it to float32, applies the very edit a bf16 tensor
gets (:func:`apply_edits`: the chunked column statistics and composition of
:mod:`abliterate.linalg`, so norm preservation acts on the de-quantized columns), quantizes it
back with fresh scales (each codec's least-error search, the old scales as a hint) and writes the
codes and scales over their old bytes: same header, dtypes, shapes and offsets. The reading,
de-quantizing and packing of each format is :mod:`abliterate.quant.stored`'s.
"""

from __future__ import annotations

import os
from pathlib import Path

from abliterate.errors import fail
from abliterate.records import Edit

FIX = "rerun `dvc repro plan`"
FORMATS = ("fp8-block", "fp8-scaled", "mxfp4", "nvfp4")


def logical(record: dict, tensors: dict) -> tuple[str, tuple[int, ...]] | None:
    """``(stored dtype, logical shape)`` of a storage record in a shard's header; ``None`` if a tensor is missing."""
    from abliterate.quant.registry import stored_names

    if any(n not in tensors for n in stored_names(record)):
        return None
    if record["format"] == "mxfp4":
        e, rows, groups, _ = tensors[record["blocks"]].shape
        return "U8", (e, groups * 32, rows)
    weight = tensors[record["weight"]]
    if record["format"] == "nvfp4":
        return "U8", (weight.shape[0], weight.shape[1] * 2)
    return weight.dtype, tuple(weight.shape)


def scales_fit(record: dict, tensors: dict) -> bool:
    """The scales have the shape and dtype their weight needs (a shard re-saved since the plan may not)."""
    from abliterate.quant.fp8 import grid_of

    if record["format"] == "mxfp4":
        blocks, scales = tensors[record["blocks"]], tensors[record["scales"]]
        return scales.dtype == "U8" and tuple(scales.shape) == tuple(blocks.shape[:-1])
    weight, scale = tensors[record["weight"]], tensors[record["scale"]]
    if record["format"] == "nvfp4":
        rows, half = weight.shape
        return (scale.dtype == "F8_E4M3" and tuple(scale.shape) == (rows, half * 2 // 16)
                and tensors[record["scale_2"]].numel == 1)
    block = tuple(record["block"]) if "block" in record else None
    return scale.dtype in ("F32", "BF16", "F16") and grid_of(*weight.shape, tuple(scale.shape), block) is not None


def check_stored(header, name: str, edits: list[Edit]) -> None:
    """The plan's quantized tensor matches the shard (names, dtypes, logical shape); plain Python."""
    record = edits[0].storage
    if record.get("format") not in FORMATS or any(e.storage != record for e in edits):
        fail(f"the plan's storage of tensor {name} is unknown or inconsistent; {FIX}")
    if len({e.layout for e in edits}) != 1 or (record["format"] == "mxfp4" and edits[0].layout != "rows"):
        fail(f"the plan mixes layouts for tensor {name}; {FIX}")
    found = logical(record, header.tensors)
    if found is None or found != (edits[0].dtype, tuple(edits[0].shape)) or not scales_fit(record, header.tensors):
        got = "missing" if found is None else f"{found[0]} {list(found[1])}"
        got += "" if found is None or found != (edits[0].dtype, tuple(edits[0].shape)) else " with other scales"
        fail(f"quantized tensor {name} in {header.path} is {got}, but the plan expects {edits[0].dtype} "
             f"{list(edits[0].shape)}; the plan is out of date: {FIX}")


def apply_edits(values, edits: list[Edit]):
    """The bf16 edit on a de-quantized float32 tensor (``[hidden, in]`` columns, ``[rows, hidden]`` rows), in place."""
    import numpy as np

    from abliterate.formats.safetensors_io import CHUNK_ELEMENTS
    from abliterate.linalg import apply_columns, apply_rows, column_coefficients, column_stats

    if not np.isfinite(values).all():
        fail(f"tensor {edits[0].tensor} de-quantizes to NaN or infinite values; the checkpoint is damaged")
    u = np.stack([np.asarray(e.vector, dtype=np.float64) for e in edits], axis=1)  # [hidden, T]
    uc = u.astype(np.float32)
    step = max(1, CHUNK_ELEMENTS // max(values.shape[1], 1))  # the row chunks of the bf16 path
    chunks = [(a, min(a + step, values.shape[0])) for a in range(0, values.shape[0], step)]
    if edits[0].layout == "columns":
        g, n2 = np.zeros((u.shape[1], values.shape[1])), np.zeros(values.shape[1])
        for a, b in chunks:
            part_g, part_n2 = column_stats(values[a:b], uc[a:b])
            g += part_g
            n2 += part_n2
        coef, f = column_coefficients(g, n2, u, [e.scale for e in edits], [e.norm_preserve for e in edits])
        for a, b in chunks:
            apply_columns(values[a:b], uc[a:b], coef.astype(np.float32), f.astype(np.float32))
        return values
    for a, b in chunks:
        for t, e in enumerate(edits):
            values[a:b] = apply_rows(values[a:b], uc[:, t], float(e.scale), bool(e.norm_preserve))
    return values


def edit_piece(fd_in: int, record: dict, tensors: dict, piece: int, edits: list[Edit], steer: bool = True) -> dict:
    """The stored arrays of one piece: de-quantized, edited, quantized back. A block-scaled FP8 writer
    goes a band of columns at a time (:mod:`abliterate.quant.banded`: the same bytes, less memory)."""
    from abliterate.quant import banded, stored

    u = edits[-1].vector if steer else None  # the last edit's vector: one edit per tensor in practice
    if banded.applies(record, tensors, edits[0].layout):
        return banded.edit_fp8_columns(fd_in, record, tensors, edits, u)
    values, state = stored.load(fd_in, record, tensors, piece)
    values = apply_edits(values, edits)
    if record["format"] == "mxfp4":  # back to the stored layout here: the plan layout's copy is freed first
        values = values.T.copy()
        return stored.quantize(record, values, state, u, edits[0].layout, stored_layout=True)
    return stored.quantize(record, values, state, u, edits[0].layout)


def rewrite_quantized(base: Path, out: Path, grouped: dict[str, list[Edit]]) -> None:
    """Overwrite, in the copy ``out`` of shard ``base``, every quantized tensor of ``grouped`` (checked
    by :func:`check_stored`) with its edited codes and fresh scales."""
    from abliterate.formats.safetensors_io import read_header
    from abliterate.quant import stored

    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    tensors = read_header(base).tensors
    keep_freed_heap()
    tasks = [(name, piece) for name in sorted(grouped) for piece in stored.pieces(grouped[name][0].storage, tensors)]
    fd_in = os.open(base, os.O_RDONLY)
    try:
        fd_out = os.open(out, os.O_WRONLY)
        largest = max((piece_bytes(grouped[name][0].storage, tensors, grouped[name][0].layout) for name, _ in tasks),
                      default=0)
        pool = ThreadPoolExecutor(max_workers=threads(len(tasks), largest, os.fstat(fd_in).st_size))
        try:
            def one(name: str, piece: int) -> None:  # one tensor, or one expert, in memory per thread
                record = grouped[name][0].storage
                stored.store(fd_out, record, tensors, piece, edit_piece(fd_in, record, tensors, piece, grouped[name]))

            done, _ = wait([pool.submit(one, *task) for task in tasks], return_when=FIRST_EXCEPTION)
            for future in done:
                future.result()  # the first error, if any, raised here
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # no thread writes once the descriptors are closed
            os.close(fd_out)
    finally:
        os.close(fd_in)


def threads(tasks: int, piece: int = 0, shard: int = 0) -> int:
    """Pieces edited at once: one per CPU (numpy releases the GIL; the writes are small, so no core is kept
    for a writer as for bf16 shards), at most 8, at most the pieces, and so many that their working memory
    (``piece`` bytes each, :func:`piece_bytes`) stays within a quarter of the ``shard``'s bytes (the peak then
    stays below half the shard: on a 0.34 GB MXFP4 bench shard two experts at once reached 0.60 of it).
    ``ABLITERATE_THREADS`` sets the count."""
    value = os.environ.get("ABLITERATE_THREADS", "")
    if value.isdigit() and int(value) > 0:
        count = int(value)
    else:
        count = min(8, os.cpu_count() or 1)
        if piece and shard:
            count = min(count, max(1, shard // (4 * piece)))
    return max(1, min(count, tasks))


def piece_bytes(record: dict, tensors: dict, layout: str) -> int:
    """Working memory of one piece while it is edited: a block-scaled FP8 writer its codes and a few bands
    (:mod:`abliterate.quant.banded`), any other piece about 12 bytes an element (float32 values, the
    quantized copy, the steering's temporaries)."""
    from abliterate.quant import banded

    if record["format"] == "mxfp4":
        _, rows, groups, _ = tensors[record["blocks"]].shape
        return 12 * rows * groups * 32
    weight = tensors[record["weight"]]
    elements = weight.numel * (2 if record["format"] == "nvfp4" else 1)
    if banded.applies(record, tensors, layout):
        return elements + 6 * 4 * banded.BAND_ELEMENTS
    return 12 * elements


def keep_freed_heap(pad: int = 64 << 20) -> None:
    """Ask the C allocator to keep ``pad`` bytes of freed heap rather than hand them back at once.

    The edit makes thousands of short-lived temporaries of about 1 MB (a band, a slice of columns);
    glibc returns each freed one to the kernel, so the next is paged in afresh, and that system time
    exceeded the arithmetic (measured on a 0.5 GB FP8 shard: 8 s of 19 s, 0.5 s with the pad, the
    same peak memory). Not glibc (no ``mallopt``): nothing to do."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-2, int(pad))  # M_TOP_PAD
