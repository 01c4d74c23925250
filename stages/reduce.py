"""reduce: fp64 means per residual index and the refusal direction (harmful - harmless).

Reads the two activation parquets row group by row group (memory: one row group), optionally
winsorizes each prompt vector (clamps it at the given quantile of its own |values|), and sums in
fp64. With several captured positions every (prompt, position) vector counts as one sample.

``artifacts/directions.safetensors`` (fp32, written byte-stably):

* ``harmful_mean.{i}``, ``harmless_mean.{i}``: the means at residual index ``i`` (0..L);
* ``direction.{i}``: the raw ``harmful_mean - harmless_mean`` computed from the fp64 means;
* ``unit.{i}``: the unit direction downstream stages use: ``normalize(direction.i)``, or with
  ``projected``, ``direction.i`` first made orthogonal to the unit harmless mean at ``i`` (two-pass
  Gram-Schmidt); all zeros where the direction is zero (e.g. index 0 at the last prompt token,
  which is the same template token for every prompt);
* ``count.harmful``, ``count.harmless``: int64, one element: the vectors averaged per index;

metadata (str -> str): ``num_layers``, ``hidden_size``, ``num_indices``, ``model``,
``model_config_sha256``, ``positions``, ``projected``, ``winsorize``, ``index_convention``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Annotated

import typer

from stages.cliutil import UserError, console, fail, new_app, parse_bool, run_app

app = new_app(__doc__.split("\n")[0])

_DTYPE_NAMES = {"float32": "F32", "float64": "F64", "int64": "I64", "int32": "I32", "float16": "F16", "int16": "I16"}


def save_safetensors(tensors: dict, metadata: dict[str, str], path: str | Path) -> None:
    """Write numpy arrays as a safetensors file, byte-stably (sorted names and metadata keys).

    The safetensors library writes its metadata in a per-process random order, so two identical
    runs would give different bytes; this writer lays out the same format deterministically.
    """
    import numpy as np

    from stages.atomic import atomic_path

    header: dict = {"__metadata__": {str(k): str(v) for k, v in sorted(metadata.items())}}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _DTYPE_NAMES[array.dtype.name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as the library does it
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for blob in blobs:
            handle.write(blob)


def read_activation_sums(path: str | Path, winsorize: float = 1.0):
    """fp64 sums per residual index of one activation parquet.

    Returns ``(sums [L+1, H] float64, counts [L+1] int64, metadata dict)``.
    """
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
    try:
        num_layers, hidden = int(meta["num_layers"]), int(meta["hidden_size"])
    except (KeyError, ValueError):
        fail(f"{path} lacks the capture metadata (num_layers, hidden_size); rerun the capture stage")
    sums = np.zeros((num_layers + 1, hidden), dtype=np.float64)
    counts = np.zeros(num_layers + 1, dtype=np.int64)
    for group in range(handle.num_row_groups):
        table = handle.read_row_group(group, columns=["layer", "activation"])
        layers = table.column("layer").to_numpy()
        column = table.column("activation").combine_chunks()
        if column.type.list_size != hidden:
            fail(f"{path} stores vectors of size {column.type.list_size}, its metadata says {hidden}; rerun capture")
        values = column.flatten().to_numpy().reshape(-1, hidden).astype(np.float64)  # [rows, H]
        if not np.isfinite(values).all():
            fail(f"{path} holds NaN or infinite activations; capture again with --dtype float32")
        if winsorize < 1.0:
            limit = np.quantile(np.abs(values), winsorize, axis=1, keepdims=True)  # [rows, 1]
            values = np.clip(values, -limit, limit)
        for index in np.unique(layers):
            if not 0 <= index <= num_layers:
                fail(f"{path} has residual index {index} outside 0..{num_layers}; rerun capture")
            rows = layers == index
            sums[index] += values[rows].sum(axis=0)
            counts[index] += int(rows.sum())
    if counts.min() == 0 or counts.min() != counts.max():
        fail(f"{path} does not hold the same number of vectors at every residual index; rerun capture")
    return sums, counts, meta


def unit_direction(direction, harmless_mean, projected: bool):
    """The unit direction (fp64): optionally orthogonal to the unit harmless mean (two passes)."""
    import numpy as np

    vector = direction.astype(np.float64)
    if projected:
        norm = np.linalg.norm(harmless_mean)
        if norm > 0:
            axis = harmless_mean / norm
            for _ in range(2):  # the second pass removes what rounding left of the first
                vector = vector - (vector @ axis) * axis
    length = np.linalg.norm(vector)
    if not length > 1e-12 * max(1.0, float(np.linalg.norm(direction))):
        return np.zeros_like(vector)
    return vector / length


def reduce_directions(harmful: Path, harmless: Path, winsorize: float = 1.0, projected: bool = False):
    """Means, raw and unit directions of two activation files. Returns ``(tensors, metadata)``."""
    import numpy as np

    if not 0.0 < winsorize <= 1.0:
        fail(f"reduce winsorize must be a quantile in (0, 1] (1.0 = off), got {winsorize}")
    h_sums, h_counts, h_meta = read_activation_sums(harmful, winsorize)
    a_sums, a_counts, a_meta = read_activation_sums(harmless, winsorize)
    for key in ("hidden_size", "num_layers", "model_config_sha256", "positions"):
        if h_meta.get(key) != a_meta.get(key):
            fail(
                f"{harmful} and {harmless} differ in {key} ({h_meta.get(key)} vs {a_meta.get(key)}); "
                "capture both prompt sets from the same model with the same settings"
            )
    h_mean = h_sums / h_counts[:, None]  # [L+1, H] fp64
    a_mean = a_sums / a_counts[:, None]
    direction = h_mean - a_mean
    norms = np.linalg.norm(direction, axis=1)
    if not (norms > 0).any():
        fail("harmful and harmless activations are identical at every residual index, so there is no direction; "
             "check that the two prompt files differ")
    tensors: dict = {
        "count.harmful": np.asarray([int(h_counts[0])], dtype=np.int64),
        "count.harmless": np.asarray([int(a_counts[0])], dtype=np.int64),
    }
    for i in range(direction.shape[0]):
        tensors[f"harmful_mean.{i}"] = h_mean[i].astype(np.float32)
        tensors[f"harmless_mean.{i}"] = a_mean[i].astype(np.float32)
        tensors[f"direction.{i}"] = direction[i].astype(np.float32)
        tensors[f"unit.{i}"] = unit_direction(direction[i], a_mean[i], projected).astype(np.float32)
    from stages.capture import INDEX_CONVENTION

    metadata = {
        "num_layers": h_meta["num_layers"],
        "hidden_size": h_meta["hidden_size"],
        "num_indices": str(direction.shape[0]),
        "model": h_meta.get("model", ""),
        "model_config_sha256": h_meta.get("model_config_sha256", ""),
        "positions": h_meta.get("positions", ""),
        "projected": "true" if projected else "false",
        "winsorize": repr(float(winsorize)),
        "index_convention": h_meta.get("index_convention", INDEX_CONVENTION),
    }
    return tensors, metadata


def reduce(harmful: Path, harmless: Path, out: Path, winsorize: float = 1.0, projected: bool = False) -> dict:
    """Write ``out`` (directions.safetensors); return its metadata."""
    tensors, metadata = reduce_directions(harmful, harmless, winsorize, projected)
    save_safetensors(tensors, metadata, out)
    console().print(
        f"reduce: {metadata['num_indices']} residual indices, {int(tensors['count.harmful'][0])} harmful / "
        f"{int(tensors['count.harmless'][0])} harmless vectors -> {out}"
    )
    return metadata


def load_directions(path: str | Path) -> tuple[dict, dict[str, str]]:
    """Read a directions file: ``(name -> torch tensor, metadata)``; clear errors if unusable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        fail(f"directions file {path} does not exist; run `dvc repro reduce` first")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable safetensors file ({exc}); rerun the reduce stage") from None
    if "num_indices" not in metadata or "direction.0" not in tensors:
        fail(f"{path} is not a directions file written by reduce (no num_indices / direction.0); rerun reduce")
    return tensors, metadata


@app.command()
def main(
    harmful: Annotated[Path, typer.Option(help="Activations of the harmful prompts (parquet).")],
    harmless: Annotated[Path, typer.Option(help="Activations of the harmless prompts (parquet).")],
    out: Annotated[Path, typer.Option(help="Output directions.safetensors.")],
    winsorize: Annotated[float, typer.Option(help="Clamp each vector at this quantile of its |values| (1.0 = off).")] = 1.0,
    projected: Annotated[str, typer.Option(help="true: unit directions orthogonal to the harmless mean.")] = "false",
) -> None:
    """Average the activations in fp64 and compute the refusal direction at every residual index."""
    reduce(harmful, harmless, out, winsorize=winsorize, projected=parse_bool(projected, "--projected"))


if __name__ == "__main__":
    run_app(app)
