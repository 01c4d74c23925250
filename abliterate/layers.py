"""Which layers an ablation edits, and how: per-layer settings and the ways to write them down.

``ablate.layers``: ``auto`` | ``8-20`` | ``3,5,8-12`` | ``12`` (decoder layers, inclusive ranges);
``auto`` takes the contiguous run of residual indices around the best-scored one whose quality is
at least ``ablate.auto-fraction`` of the best, and edits every layer touching it (writing into it
or reading from it). ``ablate.measurement``: ``auto`` (the best-scored index), a residual index
``0..L``, or ``per-layer``: each edited layer ``k`` removes the direction measured at index
``k + 1``, the residual stream it writes into (the refusal direction rotates from layer to layer;
removing each layer's own keeps up with it). Overrides are a YAML list in llm-abliteration's shape ``- {layer, measurement, scale,
sparsity}``; measurement defaults to the default measurement, scale to 1.0, sparsity to 0.0.
Entries replace the defaults of their layer (several entries for one layer are applied in
order) and add layers not in the list.
"""

from __future__ import annotations

from pathlib import Path

from abliterate.errors import fail
from abliterate.records import LayerEdit

PER_LAYER = "per-layer"  # ablate.measurement: each layer k removes the direction measured at k + 1


def parse_layers(spec: str, num_layers: int) -> list[int] | None:
    """``auto`` -> None; ``"8-20"``, ``"3,5,8-12"``, ``"12"``, ``"[3, 5]"`` -> sorted layer list."""
    text = str(spec).strip().strip("[]").strip()
    if text.lower() == "auto":
        return None
    if text.lower() == "search":
        fail("ablate.layers search is handled by plan() with --search; it is not a layer list")
    layers: set[int] = set()
    for part in text.replace(" ", ",").split(","):
        if not part:
            continue
        low, dash, high = part.partition("-")
        try:
            first, last = int(low), int(high) if dash else int(low)
        except ValueError:
            fail(f"ablate.layers: cannot read {part!r} in {spec!r}; use auto, 12, 8-20 or 3,5,8-12")
        if first > last:
            fail(f"ablate.layers: range {part!r} is empty; write it low-high")
        layers.update(range(first, last + 1))
    if not layers:
        fail(f"ablate.layers is empty ({spec!r}); use auto, 12, 8-20 or 3,5,8-12")
    bad = [k for k in sorted(layers) if not 0 <= k < num_layers]
    if bad:
        fail(f"ablate.layers asks for layer {bad[0]}, but the model has layers 0..{num_layers - 1}")
    return sorted(layers)


def parse_index(spec, num_indices: int, what: str, per_layer: bool = False) -> int | str | None:
    """``auto`` -> None; ``per-layer`` (where allowed) -> :data:`PER_LAYER`; else a residual index in ``0..L``."""
    if spec is None or str(spec).strip().lower() == "auto":
        return None
    if per_layer and str(spec).strip().lower() == PER_LAYER:
        return PER_LAYER
    try:
        value = int(str(spec).strip())
    except ValueError:
        choices = "auto, per-layer" if per_layer else "auto"
        fail(f"{what} must be {choices} or a residual index 0..{num_indices - 1}, got {spec!r}")
    if not 0 <= value < num_indices:
        fail(f"{what} {value} is out of range: residual indices are 0..{num_indices - 1}")
    return value


def load_overrides(spec: str) -> list[dict]:
    """The list at ``FILE:dotted.key`` (or the whole ``FILE``) of a YAML file."""
    import yaml

    if not str(spec).strip():
        return []
    path_text, colon, key = str(spec).rpartition(":")
    if not colon or "/" in key or "\\" in key:
        path_text, key = str(spec), ""
    path = Path(path_text)
    if not path.is_file():
        fail(f"overrides file {path} does not exist; fix --overrides-from (FILE:KEY)")
    try:
        node = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        fail(f"{path} is not valid YAML ({str(exc).splitlines()[0]}); fix the file")
    for part in [p for p in key.split(".") if p]:
        if not isinstance(node, dict) or part not in node:
            fail(f"{path} has no key {key!r} (missing {part!r}); fix --overrides-from")
        node = node[part]
    if node is None:
        return []
    if not isinstance(node, list) or not all(isinstance(e, dict) for e in node):
        fail(f"{path}:{key} must be a list of {{layer, measurement, scale, sparsity}} entries")
    return node


def measured_at(measurement: int | float | str, layer: int) -> int | float:
    """The residual index whose direction ``layer`` removes: the global ``measurement``, or with
    :data:`PER_LAYER` the index ``layer + 1`` (the residual stream that layer writes into)."""
    return layer + 1 if measurement == PER_LAYER else measurement


MAX_SCALE = 10.0  # |scale| above this changes writers by more than their own size: a typo, not a setting


def check_scale(scale: float, what: str) -> None:
    """One line for a NaN, infinite or absurd scale (params.yaml documents the range)."""
    if not -MAX_SCALE <= float(scale) <= MAX_SCALE:  # NaN fails the comparison too
        fail(f"{what} is {scale}; it must be a number in [-{MAX_SCALE:g}, {MAX_SCALE:g}]")


def resolve_layer_edits(layers: list[int], measurement: int | float | str, scale: float, sparsity: float,
                        overrides: list[dict], num_layers: int,
                        base_edits: list[LayerEdit] | None = None) -> list[LayerEdit]:
    """Per-layer settings: defaults for ``layers`` (or ``base_edits``, e.g. a searched trial's),
    replaced or extended by ``overrides``; an entry without a measurement takes the default one
    (its own ``layer + 1`` with :data:`PER_LAYER`)."""
    num_indices = num_layers + 1
    if not 0.0 <= sparsity < 1.0:
        fail(f"ablate.sparsity must be in [0, 1), got {sparsity}")
    check_scale(scale, "ablate.scale")
    by_layer: dict[int, list[LayerEdit]] = {
        k: [LayerEdit(k, measured_at(measurement, k), float(scale), float(sparsity))] for k in layers}
    if base_edits is not None:
        by_layer = {}
        for edit in base_edits:
            by_layer.setdefault(edit.layer, []).append(edit)
    replaced: set[int] = set()
    for i, entry in enumerate(overrides):
        where = f"ablate.overrides entry {i + 1} ({entry})"
        extra = set(entry) - {"layer", "measurement", "scale", "sparsity"}
        if extra or "layer" not in entry:
            fail(f"{where}: {'unknown key ' + repr(sorted(extra)[0]) if extra else 'missing layer'}; "
                 "entries take layer, measurement, scale, sparsity")
        layer = entry["layer"]
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < num_layers:
            fail(f"{where}: layer must be an integer 0..{num_layers - 1}")
        m = parse_index(entry.get("measurement"), num_indices, f"{where}: measurement")
        try:
            s, sp = float(entry.get("scale", 1.0)), float(entry.get("sparsity", 0.0))
        except (TypeError, ValueError):
            fail(f"{where}: scale and sparsity must be numbers")
        if not 0.0 <= sp < 1.0:
            fail(f"{where}: sparsity must be in [0, 1)")
        check_scale(s, f"{where}: scale")
        if layer not in replaced:
            by_layer[layer], replaced = [], replaced | {layer}
        by_layer[layer].append(LayerEdit(layer, measured_at(measurement, layer) if m is None else m, s, sp))
    return [e for k in sorted(by_layer) for e in by_layer[k]]


def auto_layers(scores: list[dict], best: int, fraction: float, num_layers: int) -> list[int]:
    """Layers touching the contiguous indices around ``best`` with quality >= fraction * best."""
    if not 0.0 < fraction <= 1.0:
        fail(f"ablate.auto-fraction must be in (0, 1], got {fraction}")
    quality = [float(s["quality"]) for s in scores]
    threshold = fraction * quality[best]
    low = high = best
    while low > 0 and quality[low - 1] >= threshold:
        low -= 1
    while high < len(quality) - 1 and quality[high + 1] >= threshold:
        high += 1
    return list(range(max(low - 1, 0), min(high, num_layers - 1) + 1))


def default_layers(scores: Path | None, tensors: dict, fraction: float, num_layers: int) -> tuple[list[int], int]:
    """What ``layers: auto`` and ``measurement: auto`` resolve to: (the layers, the best-scored index).

    ``scores``: score's ``metrics/layers.json`` (its ``best_index``); ``tensors``: the reduce tensors."""
    from abliterate.formats.metrics import read_scores
    from abliterate.scoring import index_scores

    best = int(read_scores(scores, num_layers)["best_index"])
    return auto_layers(index_scores(tensors), best, fraction, num_layers), best
