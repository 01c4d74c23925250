"""``artifacts/directions.safetensors``: what ``reduce`` measured, read by score, plan, search, finalize.

Tensors (fp32 unless noted), for every residual index ``i`` in ``0..L``:

* ``harmful_mean.{i}``, ``harmless_mean.{i}``: the fp64 means, stored as fp32;
* ``direction.{i}``: the raw ``harmful_mean - harmless_mean`` computed from the fp64 means;
* ``unit.{i}``: the unit direction the later stages remove (see :mod:`abliterate.reduction`),
  all zeros where there is none;
* ``count.harmful``, ``count.harmless``: int64, one element: the vectors averaged per index.

Metadata (str -> str): ``format`` (:data:`FORMAT`), ``num_layers``, ``hidden_size``,
``num_indices``, ``model``, ``model_config_sha256``, ``positions``, ``orthogonalized`` (``true``
when the unit directions were made orthogonal to the harmless means), ``winsorize``,
``index_convention``. The file is written byte-stably (sorted names and metadata).
"""

from __future__ import annotations

from pathlib import Path

from abliterate.errors import UserError, fail

FORMAT = "1"  # metadata key ``format``


def save_directions(tensors: dict, metadata: dict[str, str], path: str | Path) -> None:
    """Write the reduce tensors (numpy) and metadata, byte-stably and atomically."""
    from abliterate.formats.safetensors_io import write_safetensors

    write_safetensors(tensors, {**metadata, "format": FORMAT}, path)


def load_directions(path: str | Path) -> tuple[dict, dict[str, str]]:
    """Read a directions file: ``(name -> torch tensor, metadata)``; clear errors if unusable."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        fail(f"directions file {path} does not exist; run `dvc repro reduce` first")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable safetensors file ({exc}); rerun the reduce stage") from None
    if "num_indices" not in metadata or "direction.0" not in tensors:
        fail(f"{path} is not a directions file written by reduce (no num_indices / direction.0); rerun reduce")
    if metadata.get("format") != FORMAT:
        fail(f"{path} is a directions file of another version (format {metadata.get('format')!r}, this version "
             f"reads {FORMAT}); rerun reduce")
    return tensors, metadata


def check_indices(tensors: dict, num_layers: int, path: str | Path, model: str | Path) -> None:
    """One line unless the directions hold exactly the ``L + 1`` residual indices of a model of ``L`` layers."""
    if f"direction.{num_layers}" not in tensors or f"direction.{num_layers + 1}" in tensors:
        found = sum(1 for n in tensors if n.startswith("direction."))
        fail(f"{path} holds {found} residual indices but {model} has {num_layers} layers "
             f"({num_layers + 1} indices); rerun `dvc repro reduce` for this model")
