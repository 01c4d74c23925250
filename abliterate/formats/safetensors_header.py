"""The checked parse of a safetensors header: every entry's dtype, shape and byte range.

A header is the JSON object after the 8-byte length of a safetensors file. :func:`parse_entries`
refuses, with one line naming the file (and the tensor), anything the safetensors library itself
would refuse, so that a corrupt or hostile shard stops at ``use`` or ``ablate`` instead of deep in
a stage: a header that is not a JSON object, an entry without a known dtype, a shape that is not a
list of non-negative integers, ``data_offsets`` that are not two integers ``begin <= end`` inside
the data area, a byte size that is not the dtype's size times the shape's product, two tensors
whose bytes overlap, a ``__metadata__`` that is not a string -> string map.
"""

from __future__ import annotations

import json

from abliterate.errors import fail

# Every dtype the safetensors format knows -> its size in bits (F4 and F6 pack several values a byte).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}
FIX = "re-download or re-save the model"


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def decode_header(path, raw: bytes) -> dict:
    """The header bytes as a JSON object; one line if they are not one."""
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError; deep nesting a RecursionError)
        fail(f"{path} has a corrupt safetensors header (not JSON); {FIX}")
    if not isinstance(header, dict):
        fail(f"{path} has a corrupt safetensors header (not a JSON object); {FIX}")
    return header


def parse_entries(path, header: dict, data_size: int) -> tuple[list[tuple[str, str, tuple[int, ...], int, int]], dict]:
    """``([(name, dtype, shape, begin, end)], metadata)`` of a decoded header, every entry checked.

    ``begin``/``end`` are relative to the data area, whose size is ``data_size`` bytes.
    """
    metadata = header.get("__metadata__")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        fail(f"{path} has a corrupt safetensors header (__metadata__ is not a map of strings); {FIX}")
    entries = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            fail(f"{where} has no dtype/shape/data_offsets in the header; {FIX}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            fail(f"{where} has unknown dtype {str(dtype)[:20]!r}; {FIX}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            fail(f"{where} has an invalid shape (not a list of non-negative integers); {FIX}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            fail(f"{where} has invalid data_offsets (not two non-negative integers); {FIX}")
        begin, end = offsets
        if begin > end:
            fail(f"{where} has reversed data_offsets [{begin}, {end}]; {FIX}")
        if end > data_size:
            fail(f"{where} ends past the end of the file (the file is truncated or the header is wrong); {FIX}")
        numel = 1
        for d in shape:
            numel *= d
        bits = numel * DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != end - begin:
            fail(f"{where} holds {end - begin} bytes but {dtype} {shape} needs {bits / 8:g}; {FIX}")
        entries.append((name, dtype, tuple(shape), begin, end))
    last_end, last_name = 0, None
    for name, _, _, begin, end in sorted(entries, key=lambda e: (e[3], e[4])):
        if begin < last_end:
            fail(f"{path}: the bytes of tensors {last_name!r} and {name!r} overlap; {FIX}")
        if end > begin:
            last_end, last_name = end, name
    return entries, dict(metadata)
