"""The activation parquet that ``capture`` writes and ``reduce`` reads.

One row per (prompt, position, residual index), sorted by index, then prompt, then position; no
row group mixes two indices: ``prompt: int32`` (0-based, in the order of the cleaned prompt set),
``position: int16`` (negative offset from the end of the prompt, -1 = last token), ``layer: int16``
(the residual index), ``activation: fixed_size_list<float32>[hidden]``. The file metadata (str ->
str) holds ``format`` (:data:`FORMAT`), :data:`INDEX_CONVENTION`, the model, hidden size, layer count, dtype, positions and
the hashes of the chat template, system prompt and prompt file.

:class:`ActivationWriter` appends each batch's rows to one scratch file per residual index beside
the output, so memory holds one batch while capturing and one index while assembling the file.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

from abliterate.errors import fail
from abliterate.formats.atomic import atomic_path, writing

INDEX_CONVENTION = (
    "residual index i = the residual stream entering decoder layer i; 0 = embedding output; "
    "L = output of the last decoder layer before the final norm; L + 1 indices"
)
ROW_GROUP_BYTES = 1 << 27  # at most ~128 MB of activations per row group
FORMAT = "1"  # metadata key ``format``


class ActivationWriter:
    """Collects ``[L + 1, B, P, H]`` batches in scratch files; :meth:`finish` writes the sorted parquet."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        with writing(self.out):
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._scratch = tempfile.TemporaryDirectory(prefix=f".{self.out.name}.", suffix=".scratch",
                                                        dir=self.out.parent)
        self.handles: list = []
        self.order: list[int] = []  # prompt ids in the order their rows were appended
        self.hidden = 0

    def __enter__(self) -> ActivationWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._close()
        self._scratch.cleanup()

    def _close(self) -> None:
        for handle in self.handles:
            if not handle.closed:
                handle.close()

    def add(self, prompts: list[int], acts) -> None:
        """Append one batch: ``acts`` float32 ``[L + 1, B, P, H]`` for prompt ids ``prompts``."""
        with writing(self.out):  # the scratch files take as much disk as the output: a full disk is one line
            if not self.handles:
                self.hidden = int(acts.shape[-1])
                folder = Path(self._scratch.name)
                self.handles = [open(folder / f"{i:05d}.f32", "wb") for i in range(acts.shape[0])]
            self.order.extend(prompts)
            for index, handle in enumerate(self.handles):
                handle.write(acts[index].tobytes())

    def finish(self, num_prompts: int, offsets: list[int], metadata: dict[str, str]) -> None:
        """Write the parquet atomically (rows re-sorted into prompt order), then drop the scratch files."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._close()
        hidden, npos = self.hidden, len(offsets)
        rows = num_prompts * npos
        # scratch row k holds prompt order[k // P] at position offsets[k % P]; its final row:
        target = np.repeat(np.asarray(self.order, dtype=np.int64) * npos, npos) + np.tile(np.arange(npos),
                                                                                          len(self.order))
        schema = pa.schema(
            [
                ("prompt", pa.int32()),
                ("position", pa.int16()),
                ("layer", pa.int16()),
                ("activation", pa.list_(pa.float32(), hidden)),
            ]
        ).with_metadata({k.encode(): v.encode() for k, v in sorted({**metadata, "format": FORMAT}.items())})
        prompt_col = pa.array(np.repeat(np.arange(num_prompts, dtype=np.int32), npos))
        position_col = pa.array(np.tile(np.asarray(offsets, dtype=np.int16), num_prompts))
        group_rows = max(1, ROW_GROUP_BYTES // (hidden * 4))
        with atomic_path(self.out) as tmp:
            with pq.ParquetWriter(tmp, schema, compression="none", use_dictionary=False,
                                  write_statistics=["prompt", "position", "layer"]) as writer:
                for index, handle in enumerate(self.handles):
                    path = Path(handle.name)
                    scratch = np.fromfile(path, dtype=np.float32).reshape(rows, hidden)  # [N*P, H], batch order
                    data = np.empty_like(scratch)
                    data[target] = scratch  # [N*P, H], prompt order
                    del scratch
                    for start in range(0, rows, group_rows):
                        stop = min(rows, start + group_rows)
                        values = pa.array(data[start:stop].reshape(-1))
                        table = pa.Table.from_arrays(
                            [
                                prompt_col.slice(start, stop - start),
                                position_col.slice(start, stop - start),
                                pa.array(np.full(stop - start, index, dtype=np.int16)),
                                pa.FixedSizeListArray.from_arrays(values, hidden),
                            ],
                            schema=schema,
                        )
                        writer.write_table(table, row_group_size=stop - start)
                    path.unlink()


def read_activations(path: str | Path) -> tuple[dict[str, str], int, int, Iterator[tuple[object, object]]]:
    """``(metadata, L, hidden, row groups)`` of an activation file; each row group is
    ``(residual indices [rows] int16, vectors [rows, H] float64)``, checked as it is read."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        fail(f"activation file {path} does not exist; run `dvc repro capture` first")
    try:
        handle = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        fail(f"{path} is not a readable parquet file ({exc}); rerun the capture stage")
    meta = {k.decode(): v.decode() for k, v in (handle.schema_arrow.metadata or {}).items()}
    if meta.get("format") != FORMAT:
        fail(f"{path} is not an activation file of format {FORMAT} (it says {meta.get('format')!r}); "
             "rerun the capture stage")
    try:
        num_layers, hidden = int(meta["num_layers"]), int(meta["hidden_size"])
    except (KeyError, ValueError):
        fail(f"{path} lacks the capture metadata (num_layers, hidden_size); rerun the capture stage")

    def groups() -> Iterator[tuple[object, object]]:
        for group in range(handle.num_row_groups):
            table = handle.read_row_group(group, columns=["layer", "activation"])
            layers = table.column("layer").to_numpy()
            column = table.column("activation").combine_chunks()
            if column.type.list_size != hidden:
                fail(f"{path} stores vectors of size {column.type.list_size}, its metadata says {hidden}; rerun capture")
            values = column.flatten().to_numpy().reshape(-1, hidden).astype(np.float64)  # [rows, H]
            finite = np.isfinite(values).all(axis=1)
            if not finite.all():
                fail(nonfinite_hint(path, meta.get("dtype", ""), int(layers[~finite].min())))
            bad = layers[(layers < 0) | (layers > num_layers)]
            if bad.size:
                fail(f"{path} has residual index {bad[0]} outside 0..{num_layers}; rerun capture")
            yield layers, values

    return meta, num_layers, hidden, groups()


def nonfinite_hint(path, dtype: str, index: int) -> str:
    """The one line for NaN/Inf activations first seen at residual ``index`` (rows come sorted by index).

    The embedding output cannot overflow, nor can a float32 forward pass of a sane model: there the
    weights hold the NaN/Inf and no dtype helps. After a 16-bit capture an overflow is likely.
    """
    if index == 0 or dtype in ("float32", "float64"):
        culprit = ("the embedding weights" if index == 0
                   else f"the weights of decoder layer {index - 1} (or its norms)")
        return (f"{path} holds NaN or infinite activations from residual index {index} on, although captured in "
                f"{dtype or 'float32'}: {culprit} hold NaN/Inf values, which no dtype fixes; re-download or repair "
                "the model")
    return (f"{path} holds NaN or infinite activations from residual index {index} (the output of decoder layer "
            f"{index - 1}) on, captured in {dtype}: likely a {dtype} overflow; capture again with --dtype float32 "
            f"(if they remain, the weights of decoder layer {index - 1} hold NaN/Inf values)")
