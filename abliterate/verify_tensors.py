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


def recompute(fd_base: int, fd_abl: int, info, edits: list[Edit], roundoff: float) -> Recomputed:
    """Compare the ablated tensor ``info`` (same offsets in both files) with ablate's producer run on
    the base; ``roundoff``: the unit roundoff of ``info.dtype``."""
    import numpy as np

    from abliterate.formats.safetensors_io import FLOAT_DTYPES, as_rows, decode, encode, read_into
    from abliterate.shard_edit import producer

    storage, item = FLOAT_DTYPES[info.dtype]
    _, cols = as_rows(info)
    result = Recomputed()

    def write(chunk, first_row: int, finite: bool = False) -> None:
        # the chunk lives in the producer's buffers: encode (a copy) before anything else
        expected = np.array(encode(chunk, info.dtype, finite=finite), dtype=storage).reshape(-1)
        got = np.empty(expected.size, dtype=storage)
        read_into(fd_abl, memoryview(got).cast("B"), info.begin + first_row * cols * item, info.name)
        result.elements += expected.size
        if got.tobytes() == expected.tobytes():
            return
        result.identical = False
        e = decode(expected, info.dtype).astype(np.float64)
        a = decode(got, info.dtype).astype(np.float64)
        diff = np.abs(a - e)
        allowed = 4 * roundoff * np.abs(e) + CANCELLATION * float(np.nanmax(np.abs(e), initial=0.0))
        beyond = ~(diff <= allowed)  # NaN on either side counts
        if beyond.any():
            result.outside += int(beyond.sum())
            worst = diff[beyond]
            result.worst = max(result.worst, float(np.where(np.isnan(worst), np.inf, worst).max()))

    producer(edits)(fd_base, info, write)
    return result
