"""``ablate.quantized-edits: bfloat16``: edited quantized tensors written unquantized, exactly.

For users who prefer the exact edit to the checkpoint's size. Each edited quantized tensor is
written as bfloat16 in the layout of the model's bf16 release (FP8 and NVFP4 ``weight [out, in]``;
an MXFP4 expert tensor ``x_blocks``/``x_scales`` becomes ``x [E, in, out]``), its scales are
dropped, and the module it belongs to is named in the config's list of modules not to quantize
(``modules_to_not_convert``; compressed-tensors ``ignore``; ModelOpt ``exclude_modules``), so
transformers builds a plain module there. A module is converted whole: the other quantized tensors
of a converted MXFP4 experts module (``gate_up_proj`` when ``down_proj`` is edited) are written
de-quantized too, which is exact (an E2M1 value times a power of two is a bfloat16 value).

The plan decides it (:func:`convert_plan`): edits of converted tensors carry ``storage.output:
bfloat16`` and each shard's document lists the unedited tensors it expands (``expand``);
:func:`output_changes` says what the folder's config and index become (the plan's
``_output.json``, :mod:`abliterate.formats.plan_output`, which the ``carry`` stage applies). ablate writes such
a shard anew (:func:`write_shard`): a new header, every other tensor's bytes copied.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from abliterate.errors import fail
from abliterate.records import Edit

MODES = ("requantize", "bfloat16")
BF16 = "bfloat16"
FIX = "rerun `dvc repro plan`"


def converts(record: dict | None) -> bool:
    """True for a storage record written as bfloat16."""
    return record is not None and record.get("output") == BF16


def module_of(record: dict) -> str:
    """The module a stored tensor belongs to (what the config lists as not to convert)."""
    if record["format"] == "mxfp4":
        return record["blocks"][: -len("_blocks")].rsplit(".", 1)[0]
    return record["weight"][: -len(".weight")]


def main_name(record: dict) -> str:
    """The stored tensor whose place the bfloat16 tensor takes (its scales are dropped)."""
    return record["blocks"] if record["format"] == "mxfp4" else record["weight"]


def logical_name(record: dict) -> str:
    """The bfloat16 tensor's name: the weight's own, or an MXFP4 tensor's without ``_blocks``."""
    return record["blocks"][: -len("_blocks")] if record["format"] == "mxfp4" else record["weight"]


def convert_plan(model: Path, names: dict[str, str], edits: list[Edit]) -> tuple[list[Edit], dict[str, list[dict]]]:
    """``(edits, expand)``: the quantized edits marked for bfloat16 output, and per shard file the
    unedited quantized tensors of the converted modules (``{"tensor", "storage", "shape"}``).
    ``names``: tensor -> shard file of the checkpoint ``model``."""
    from dataclasses import replace

    from abliterate.formats.safetensors_io import read_header
    from abliterate.quant.registry import method_of, storage_of, stored_names

    headers = {f: read_header(Path(model) / f) for f in sorted(set(names.values()))}
    info = {n: headers[f].tensors[n] for n, f in names.items()}
    qc = method_of(model)

    out, modules = [], set()
    for edit in edits:
        if edit.storage is not None:
            edit = replace(edit, storage={**edit.storage, "output": BF16})
            modules.add(module_of(edit.storage))
        out.append(edit)
    edited = {e.tensor for e in edits}
    expand: dict[str, list[dict]] = defaultdict(list)
    for module in sorted(modules):
        prefix = module + "."
        children = sorted({n[: -len("_blocks")] if n.endswith("_blocks") else n for n in info
                           if n.startswith(prefix) and "." not in n[len(prefix):]
                           and (n.endswith("_blocks") or n == prefix + "weight")})
        for name in children:
            found = None if name in edited else storage_of(name, info, qc, "rows")
            if found is None:
                continue
            record, _, shape = found
            files = sorted({names[n] for n in stored_names(record)})
            if len(files) != 1:
                fail(f"{name} and its scales are split over shards {', '.join(files)}; re-save the checkpoint with "
                     "them together, or set ablate.quantized-edits: requantize")
            expand[files[0]].append({"tensor": name, "storage": {**record, "output": BF16}, "shape": list(shape)})
    return out, dict(expand)


def plan_documents(model: Path, names: dict[str, str], edits: list[Edit], shards: dict[str, str], hidden: int,
                   mode: str) -> tuple[list[Edit], dict[str, dict]]:
    """``(edits, documents)``: the plan's shard documents (:func:`abliterate.formats.plans.shard_documents`);
    with ``mode`` bfloat16, quantized edits marked for it and each shard's ``expand`` list."""
    from abliterate.formats.plans import shard_documents

    if mode not in MODES:
        fail(f"ablate.quantized-edits is {mode!r}; use one of {', '.join(MODES)}")
    expand: dict[str, list[dict]] = {}
    if mode == BF16 and any(e.storage is not None for e in edits):
        edits, expand = convert_plan(model, names, edits)
    documents = shard_documents(edits, shards, hidden)
    key_of = {f: k for k, f in shards.items()}
    for file, entries in expand.items():
        documents[key_of[file]]["expand"] = sorted(entries, key=lambda x: x["tensor"])
    return edits, documents


def converted_records(doc: dict) -> list[tuple[str, dict, tuple[int, ...]]]:
    """``(logical name, record, logical shape)`` of every tensor a shard document writes as bfloat16."""
    found = {}
    for entry in doc.get("edits", []) + doc.get("expand", []):
        record = entry.get("storage")
        if converts(record):
            found[entry["tensor"]] = (entry["tensor"], record, tuple(entry["shape"]))
    return [found[k] for k in sorted(found)]


def check_expand(header, entries) -> None:
    """A shard document's ``expand`` list fits the shard (plain Python, before anything is written)."""
    from abliterate.quant.rewrite import logical, scales_fit

    if not isinstance(entries, list):
        fail(f"the plan's expand list for {header.path} is not a list; {FIX}")
    for entry in entries:
        record = entry.get("storage") if isinstance(entry, dict) else None
        if not converts(record) or record.get("format") not in ("fp8-block", "fp8-scaled", "mxfp4", "nvfp4"):
            fail(f"the plan's expand entry {entry!r:.80} for {header.path} is not a converted quantized tensor; {FIX}")
        found = logical(record, header.tensors)
        if found is None or found[1] != tuple(entry.get("shape", ())) or not scales_fit(record, header.tensors):
            fail(f"quantized tensor {entry.get('tensor')} in {header.path} does not have the plan's layout; {FIX}")


# --- the new shard: header and bytes --------------------------------------------------------------

def new_layout(header, converted: list[tuple[str, dict, tuple[int, ...]]]) -> list[tuple[str, str, tuple, int, object]]:
    """``(name, dtype, shape, bytes, source)`` of the written shard in the base's data order; ``source``:
    the base TensorInfo to copy, or the record of a tensor written as bfloat16 (its scales dropped)."""
    from abliterate.quant.registry import stored_names

    by_main = {main_name(rec): (name, rec, shape) for name, rec, shape in converted}
    dropped = {n for _, rec, _ in converted for n in stored_names(rec)} - set(by_main)
    layout = []
    for info in sorted(header.tensors.values(), key=lambda i: (i.begin, i.name)):
        if info.name in dropped:
            continue
        if info.name in by_main:
            name, record, shape = by_main[info.name]
            count = 1
            for d in shape:
                count *= d
            layout.append((name, "BF16", tuple(shape), 2 * count, record))
        else:
            layout.append((info.name, info.dtype, tuple(info.shape), info.nbytes, info))
    return layout


def header_bytes(layout, metadata: dict[str, str]) -> bytes:
    """The length prefix and JSON header of a shard with ``layout`` (data 8-byte aligned, as safetensors writes)."""
    import struct

    doc: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name, dtype, shape, nbytes, _ in layout:
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def bf16_pieces(fd: int, record: dict, tensors: dict, edits: list[Edit] | None):
    """Yield each piece (the tensor, or one expert) of a converted tensor as float32 values in the bf16
    layout: de-quantized, and edited as a bf16 tensor would be when ``edits`` are given."""
    import numpy as np

    from abliterate.quant import stored
    from abliterate.quant.rewrite import apply_edits

    for piece in stored.pieces(record, tensors):
        values, _ = stored.load(fd, record, tensors, piece)  # MXFP4: transposed to [in, out], the bf16 layout
        if edits:
            values = apply_edits(values, edits)
        elif not np.isfinite(values).all():
            fail(f"tensor {logical_name(record)} de-quantizes to NaN or infinite values; the checkpoint is damaged")
        yield values


def write_shard(base: Path, out: Path, grouped: dict[str, list[Edit]], expand: list[dict], producers: dict,
                progress=None) -> None:
    """Write ``out``: shard ``base`` with the converted tensors in bfloat16 (edited where planned), the plain
    edits' tensors from ``producers`` (:func:`abliterate.shard_edit.producers`) and every other tensor copied."""
    import numpy as np

    from abliterate.formats.safetensors_io import as_rows, copy_range, encode, read_header, write_at

    header = read_header(base)
    converted = [(name, e[0].storage, tuple(e[0].shape)) for name, e in grouped.items() if converts(e[0].storage)]
    converted += [(x["tensor"], x["storage"], tuple(x["shape"])) for x in expand]
    layout = new_layout(header, converted)
    head = header_bytes(layout, header.metadata)
    fd_in = os.open(base, os.O_RDONLY)
    try:
        fd_out = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_at(fd_out, head, 0)
            at = len(head)
            for name, dtype, shape, nbytes, source in layout:
                if isinstance(source, dict):  # converted: piece by piece, in bfloat16
                    pos = at
                    for values in bf16_pieces(fd_in, source, header.tensors, grouped.get(name)):
                        data = encode(values, "BF16")
                        write_at(fd_out, data, pos)
                        pos += data.nbytes
                    if pos - at != nbytes:
                        raise ValueError(f"tensor {name}: {pos - at} of {nbytes} bytes written")
                elif name in producers:  # a plain edit: the bf16 path's own producer, written at the new offset
                    _, cols = as_rows(source)
                    item = nbytes // max(source.numel, 1)

                    def write(chunk, first_row: int, finite: bool = False, base_at=at, cols=cols, item=item,
                              dtype=dtype) -> None:
                        data = np.ascontiguousarray(encode(chunk, dtype, finite=finite))
                        write_at(fd_out, data, base_at + first_row * cols * item)

                    producers[name](fd_in, source, write)
                else:
                    copy_range(fd_in, fd_out, source.begin, nbytes, at)
                at += nbytes
                if progress is not None:
                    progress(nbytes)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


# --- the folder: config and index --------------------------------------------------------------------

def output_changes(model: Path, documents: dict[str, dict]) -> dict:
    """What the ablated folder's config and index become (``_output.json``): the modules not to convert,
    the stored tensors removed, the bfloat16 tensors added (name -> shard file) and the change in bytes."""
    from abliterate.formats.safetensors_io import read_header
    from abliterate.quant.registry import stored_names

    modules, removed, added, change = set(), set(), {}, 0
    for _, doc in sorted(documents.items()):
        records = converted_records(doc)
        if not records:
            continue
        tensors = read_header(Path(model) / doc["file"]).tensors
        for name, record, shape in records:
            modules.add(module_of(record))
            gone = stored_names(record)
            removed.update(gone)
            added[name] = doc["file"]
            count = 1
            for d in shape:
                count *= d
            change += 2 * count - sum(tensors[n].nbytes for n in gone)
    from abliterate.formats.plan_output import FORMAT

    return {"format": FORMAT, "not_converted": sorted(modules), "removed": sorted(removed),
            "added": dict(sorted(added.items())), "size_change": change}
