"""verify's recomputation of an edited tensor: the bytes ablate must have written, from the base tensor and the plan.

:func:`recompute` runs the very producer ablate runs (:func:`abliterate.shard_edit.producer`: the
same chunks, the same fp32 (fp64) arithmetic, the same rounding to the stored dtype by
:func:`abliterate.formats.safetensors_io.encode`) on the base tensor, and compares each chunk with
the ablated file's bytes at the same offset. The computation is deterministic for one numpy/BLAS
build on one kind of CPU (chunking, summation order and threads are fixed), so an honest shard is
bit-identical; on another machine the fp32 sums may round differently, so a value may also differ
by at most ``4 u |expected| + 1e-5 max|expected|`` per chunk (``u`` the stored dtype's unit
roundoff: a flipped last bit after rounding, plus fp32 cancellation near zero). A negated column,
an undone or halved edit lies far outside that.
"""

from __future__ import annotations

from dataclasses import dataclass

from abliterate.records import Edit

CANCELLATION = 1e-5  # of the chunk's largest |value|: what fp32 sums in another order may leave near zero


@dataclass
class Recomputed:
    """One edited tensor compared with its recomputation."""

    elements: int = 0
    identical: bool = True  # every byte as recomputed
    outside: int = 0  # elements beyond the rounding allowance (NaN included)
    worst: float = 0.0  # the largest |ablated - expected| among them

    @property
    def ok(self) -> bool:
        return self.outside == 0


def compare(result: Recomputed, expected, got, dtype: str, roundoff: float) -> None:
    """Add one chunk to ``result``: ``expected`` and ``got`` in storage form (numpy, ``dtype``)."""
    import numpy as np

    from abliterate.formats.safetensors_io import decode

    result.elements += expected.size
    if got.tobytes() == expected.tobytes():
        return
    result.identical = False
    e = decode(expected, dtype).astype(np.float64)
    a = decode(got, dtype).astype(np.float64)
    diff = np.abs(a - e)
    allowed = 4 * roundoff * np.abs(e) + CANCELLATION * float(np.nanmax(np.abs(e), initial=0.0))
    beyond = ~(diff <= allowed)  # NaN on either side counts
    if beyond.any():
        result.outside += int(beyond.sum())
        worst = diff[beyond]
        result.worst = max(result.worst, float(np.where(np.isnan(worst), np.inf, worst).max()))


def recompute(fd_base: int, fd_abl: int, info, edits: list[Edit], roundoff: float, at: int | None = None) -> Recomputed:
    """Compare the ablated tensor ``info`` (at byte ``at`` of the ablated file; default: the base's
    offset) with ablate's producer run on the base; ``roundoff``: the unit roundoff of ``info.dtype``."""
    import numpy as np

    from abliterate.formats.safetensors_io import FLOAT_DTYPES, as_rows, encode, read_into
    from abliterate.shard_edit import producer

    storage, item = FLOAT_DTYPES[info.dtype]
    _, cols = as_rows(info)
    start = info.begin if at is None else at
    result = Recomputed()

    def write(chunk, first_row: int, finite: bool = False) -> None:
        # the chunk lives in the producer's buffers: encode (a copy) before anything else
        expected = np.array(encode(chunk, info.dtype, finite=finite), dtype=storage).reshape(-1)
        got = np.empty(expected.size, dtype=storage)
        read_into(fd_abl, memoryview(got).cast("B"), start + first_row * cols * item, info.name)
        compare(result, expected, got, info.dtype, roundoff)

    producer(edits)(fd_base, info, write)
    return result


# A quantized value recomputed on another machine may land on the neighbouring grid point: one step
# of E4M3 is 2^-3 of the value, of E2M1 up to a half (relative to the larger of the two values).
QUANTIZED_STEP = {"fp8": 2.0**-3, "mxfp4": 0.5, "nvfp4": 0.5}


def recompute_quantized(base, ablated, edits: list[Edit]) -> Recomputed:
    """Compare an edited quantized tensor (codes and scales) with ablate's own rewrite of the base
    (:func:`abliterate.quant.rewrite.edit_piece`, piece by piece), de-quantized: identical when the
    bytes are, else each value within one grid step of the recomputed one."""
    import os

    import numpy as np

    from abliterate.formats.safetensors_io import read_header
    from abliterate.quant import stored
    from abliterate.quant.rewrite import edit_piece

    record = edits[0].storage
    tb, ta = read_header(base).tensors, read_header(ablated).tensors
    step = QUANTIZED_STEP.get(str(record.get("format", "")).split("-")[0], 0.5)
    result = Recomputed()
    fd_b, fd_a = os.open(base, os.O_RDONLY), os.open(ablated, os.O_RDONLY)
    try:
        for piece in stored.pieces(record, tb):
            arrays = edit_piece(fd_b, record, tb, piece, edits)
            expected = np.asarray(stored.dequantize(record, arrays), dtype=np.float64)
            got = np.asarray(stored.load(fd_a, record, ta, piece)[0], dtype=np.float64)
            result.elements += expected.size
            if got.shape == expected.shape and np.array_equal(got, expected):
                continue
            result.identical = False
            if got.shape != expected.shape:
                result.outside += expected.size
                result.worst = float("inf")
                continue
            diff = np.abs(got - expected)
            beyond = ~(diff <= step * np.maximum(np.abs(got), np.abs(expected)) + 1e-6 * np.abs(expected).max())
            if beyond.any():
                result.outside += int(beyond.sum())
                result.worst = max(result.worst, float(np.where(np.isnan(diff[beyond]), np.inf, diff[beyond]).max()))
    finally:
        os.close(fd_b)
        os.close(fd_a)
    return result
