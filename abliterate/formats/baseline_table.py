"""``artifacts/baseline.parquet``: the base model's answers and the KL references, written by ``baseline``.

One row per eval prompt, in the order of :data:`SETS` (harmful, then plain harmless, then
borderline: edgy but harmless):

  ``set`` (harmful | harmless | borderline), ``index`` (position in its file), ``text``,
  ``prompt_ids`` (the rendered chat-template tokens), ``answer_ids`` (the greedy answer, with the
  EOS that ended it), ``answer`` (decoded text), ``stop`` (eos | length | early), ``refused``;
  and, on harmless rows only (null on the others), what KL needs:

  * ``first_logprobs``: the full next-token distribution at the first answer position, fp32
    log-probabilities over the whole vocabulary (exact first-token KL; 4 bytes x vocab per prompt,
    e.g. 0.6 MB for a 150k vocabulary);
  * ``kl_ids`` / ``kl_logprobs`` / ``kl_tail``: along the base answer's first ``kl-tokens`` tokens
    (teacher-forced), the top-k token ids and fp32 log-probabilities per position, and the fp64 log
    of the remaining mass (:func:`abliterate.kl.top_k_summary`).

File metadata (key :data:`META_KEY`, JSON) records the generation settings, template and prompt
hashes, stop ids and vocabulary size (``kind: baseline``, ``format``: :data:`FORMAT`), so
``evaluate`` needs no other parameter and never renders a prompt itself. The file is
byte-deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path

from abliterate.errors import fail

META_KEY = b"abliterate"
FORMAT = 2  # 1: no borderline set
SETS = ("harmful", "harmless", "borderline")


def write_baseline(out: str | Path, sets, index, texts, prompt_ids, answers, answer_texts, refused, first, along,
                   meta: dict) -> None:
    """Write the table atomically (``first``: row -> [vocab] fp32 numpy; ``along``: row -> (ids, log-probs, tails))."""
    import pyarrow.parquet as pq

    from abliterate.formats.atomic import atomic_path

    table = _table(sets, index, texts, prompt_ids, answers, answer_texts, refused, first, along, meta)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=max(1, len(sets)))


def _table(sets, index, texts, prompt_ids, answers, answer_texts, refused, first, along, meta):
    import pyarrow as pa

    rows = range(len(sets))
    schema = pa.schema([
        ("set", pa.string()), ("index", pa.int32()), ("text", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())), ("answer_ids", pa.list_(pa.int32())), ("answer", pa.string()),
        ("stop", pa.string()), ("refused", pa.bool_()), ("first_logprobs", pa.list_(pa.float32())),
        ("kl_ids", pa.list_(pa.list_(pa.int32()))), ("kl_logprobs", pa.list_(pa.list_(pa.float32()))),
        ("kl_tail", pa.list_(pa.float64())),
    ], metadata={META_KEY: json.dumps({**meta, "kind": "baseline", "format": FORMAT}, sort_keys=True).encode("utf-8")})
    return pa.table({
        "set": sets, "index": index, "text": texts, "prompt_ids": prompt_ids,
        "answer_ids": [a.ids for a in answers], "answer": answer_texts, "stop": [a.stop for a in answers],
        "refused": refused, "first_logprobs": _list_column(first, len(sets)),
        "kl_ids": [along[i][0] if i in along else None for i in rows],
        "kl_logprobs": [along[i][1] if i in along else None for i in rows],
        "kl_tail": [along[i][2] if i in along else None for i in rows],
    }, schema=schema)


def _list_column(values: dict, n: int):
    """A ``list<float32>`` column built from numpy rows (null where a row has none), without Python floats."""
    import numpy as np
    import pyarrow as pa

    offsets, chunks = [0], []
    for i in range(n):
        if i in values:
            chunks.append(np.asarray(values[i], dtype=np.float32))
        offsets.append(offsets[-1] + (len(chunks[-1]) if i in values else 0))
    flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat),
                                    mask=pa.array([i not in values for i in range(n)]))


def _numpy_rows(column) -> list:
    """A ``list<float32>`` column as numpy arrays (None for null rows)."""
    array = column.combine_chunks()
    offsets = array.offsets.to_numpy()
    flat = array.values.to_numpy(zero_copy_only=False).copy()  # writable, so torch can wrap it
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    return [flat[offsets[i]:offsets[i + 1]] if valid[i] else None for i in range(len(array))]


def read_baseline(path: str | Path) -> tuple[dict, dict]:
    """(columns as Python lists, metadata) of a baseline file; a clear error if it is not one.

    ``first_logprobs`` comes back as numpy arrays (a vocabulary of floats per row)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        fail(f"baseline file {path} does not exist; run `dvc repro baseline` (or `abliterate baseline ...`) first")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        fail(f"baseline file {path} is not readable parquet ({type(exc).__name__}); rerun `dvc repro baseline`")
    raw = (table.schema.metadata or {}).get(META_KEY)
    meta = json.loads(raw) if raw else {}
    if meta.get("kind") != "baseline" or meta.get("format") != FORMAT:
        fail(f"{path} is not a baseline file of this version (no '{META_KEY.decode()}' metadata of format "
             f"{FORMAT}); rerun `dvc repro baseline`")
    columns = table.drop_columns(["first_logprobs"]).to_pydict()
    columns["first_logprobs"] = _numpy_rows(table.column("first_logprobs"))
    return columns, meta
