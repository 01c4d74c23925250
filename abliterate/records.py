"""The small typed records the stages hand each other: per-layer settings, ablation options, edits.

:class:`LayerEdit` is one per-layer setting (``_settings.json`` and ``search.json`` store them),
:class:`AblationOptions` the options every edit of an ablation shares, :class:`Edit` one edit of
one tensor (the entries of a plan file). Each writes itself as JSON and reads itself back; the
files that hold them are :mod:`abliterate.formats.plans` and :mod:`abliterate.formats.search_result`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

DEFAULT_TARGETS = ("attention",)


@dataclass(frozen=True)
class LayerEdit:
    layer: int
    measurement: int | float  # a residual index; fractional ones interpolate two adjacent directions
    scale: float
    sparsity: float
    roles: tuple[str, ...] | None = None  # None: every targeted role of the layer

    def to_json(self) -> dict:
        """The setting as ``_settings.json`` and ``search.json`` store it (``roles`` only where it is set)."""
        doc = {"layer": self.layer, "measurement": self.measurement, "scale": self.scale, "sparsity": self.sparsity}
        if self.roles is not None:
            doc["roles"] = list(self.roles)
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> LayerEdit:
        roles = doc.get("roles")
        return cls(int(doc["layer"]), doc["measurement"], float(doc["scale"]), float(doc["sparsity"]),
                   None if roles is None else tuple(roles))


@dataclass(frozen=True)
class AblationOptions:
    """How every edit of an ablation is made; the defaults are ``params.yaml``'s ``ablate.*`` values.

    ``sparsity`` is the default of the per-layer settings (a layer override may set its own).
    """

    norm_preserve: bool = True  # keep every edited column's (row's) norm
    projected: bool = True  # biprojection against the harmless means at m and k + 1
    sparsity: float = 0.0  # fraction of the direction's smallest components zeroed
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)  # roles edited, in ROLES order

    def to_json(self) -> dict:
        return {"norm_preserve": bool(self.norm_preserve), "projected": bool(self.projected),
                "sparsity": float(self.sparsity), "targets": list(self.targets)}


@dataclass(frozen=True)
class Edit:
    """One edit of one tensor: remove the unit direction ``r`` at scale ``s`` by editing with ``u``.

    ``u = normalize(g * r)`` where a norm gain ``g`` sits between the tensor and the residual
    stream (:func:`abliterate.linalg.fold_gain`), else ``r``. ``direction`` and ``vector`` are
    fp64 values of size ``hidden``: numpy arrays when built, the plan file's lists when read back.
    """

    tensor: str  # the on-disk tensor name
    file: str  # the shard file that stores it
    role: str  # one of ROLES
    layer: int | None  # the decoder layer; None for the embeddings
    layout: str  # "columns" (a 2-D writer [hidden, in]) or "rows" (residual = last axis)
    bias: bool  # biases take the plain edit
    norm_preserve: bool
    scale: float
    measurement: int | float  # the residual index the direction was measured at
    sparsity: float
    projected: bool
    direction: Sequence[float]  # r [hidden]
    vector: Sequence[float]  # u [hidden]
    gain: str | None  # the norm weight folded into u, if any
    gain_offset: float  # 1.0 where that norm computes x * (1 + weight)
    dtype: str  # the stored safetensors dtype
    shape: tuple[int, ...]
    storage: dict | None = None  # quantized storage (abliterate.quant.registry); None: plain floats

    def to_json(self, direction_id: str, vector_id: str) -> dict:
        """The plan file's entry: every field but ``file``, the vectors by their ids in the shard's table."""
        doc = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "file"}
        doc.update(direction=direction_id, vector=vector_id, shape=list(self.shape))
        if self.storage is None:  # plans of unquantized models keep their bytes
            del doc["storage"]
        return doc

    @classmethod
    def from_json(cls, doc: dict, vectors: dict[str, Sequence[float]], file: str) -> Edit:
        """An entry of a plan file, its vector ids resolved in ``vectors`` (a ``KeyError`` if one is missing)."""
        values = {f.name: doc[f.name] for f in fields(cls) if f.name not in ("file", "storage")}
        values.update(file=file, direction=vectors[doc["direction"]], vector=vectors[doc["vector"]],
                      shape=tuple(doc["shape"]), storage=doc.get("storage"))
        return cls(**values)
