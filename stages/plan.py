"""plan: decide every tensor edit, one deterministic JSON per shard.

For each decoder layer ``k`` to edit and each of its settings ``(measurement m, scale s,
sparsity)``: ``r = unit.m`` from the directions, with ``projected`` orthogonalized jointly (QR,
fp64) against the unit harmless means at ``m`` and ``k + 1`` (the residual layer ``k`` writes
into), then sparsified; each targeted tensor of layer ``k`` gets ``u = normalize(g * r)`` where a
norm gain ``g`` sits in between (see ``stages.targets``). Embeddings (an optional target) write
into residual index 0 and use the default measurement, scale and sparsity.

``artifacts/plan/<shard key>.json`` is written for every shard of ``model.yaml``: the edits of
the tensors stored in that shard (an empty list for untouched shards) with their unit vectors
embedded as fp64 values, so ``ablate@<shard>`` needs only its base shard and its plan file, and a
shard whose edits did not change keeps identical bytes (DVC then skips its ablate stage).
``_settings.json`` beside them holds the resolved per-layer settings (read by ``finalize``).

Settings: ``--layers`` auto | ``8-20`` | ``3,5,8-12`` | ``12`` (decoder layers, inclusive ranges);
``auto`` takes the contiguous run of residual indices around the best-scored one whose quality
is at least ``--auto-fraction`` of the best, and edits every layer touching it (writing into it or
reading from it). ``--measurement`` auto (the best-scored index) or a residual index ``0..L``.
``--overrides-from FILE:KEY`` reads a YAML list at the dotted ``KEY`` of ``FILE`` (``FILE`` alone:
the whole file is the list), in llm-abliteration's shape ``- {layer, measurement, scale,
sparsity}``; measurement defaults to the default measurement, scale to 1.0, sparsity to 0.0.
Entries replace the defaults of their layer (several entries for one layer are applied in
order) and add layers not in ``--layers``. DVC cannot put a list of dicts on a command line, so
the pipeline points this at ``params.yaml:ablate.overrides``; llm-abliteration users can point it
at their own config (``--overrides-from mycfg.yml:ablate``). ``scale = 0`` edits are dropped.
Embeddings tied to the output head (``tie_word_embeddings``) are refused as a target: editing
them would change every output logit as well.

``--layers search`` takes the per-layer settings of the trial the ``search`` stage chose
(``--search artifacts/search.json``): a fractional measurement and separate attention and MLP
scales per layer; ``--overrides-from`` still applies on top. The search must have been run with
this plan's norm-preserve, projected, sparsity and targets and on the same directions file (under
DVC it always is: it reads the same keys), else plan stops with a one-line error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import typer

from stages.cliutil import console, fail, new_app, parse_bool, run_app
from stages.targets import ROLES

app = new_app(__doc__.split("\n")[0])
FORMAT = 1
SETTINGS_FILE = "_settings.json"


@dataclass(frozen=True)
class LayerEdit:
    layer: int
    measurement: int | float  # a residual index; fractional ones interpolate two adjacent directions
    scale: float
    sparsity: float
    roles: tuple[str, ...] | None = None  # None: every targeted role of the layer


def layer_edit_dict(edit: LayerEdit) -> dict:
    """A layer setting as written to ``_settings.json`` (``roles`` only where it is set)."""
    doc = asdict(edit)
    if edit.roles is None:
        del doc["roles"]
    else:
        doc["roles"] = list(edit.roles)
    return doc


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


def parse_index(spec, num_indices: int, what: str) -> int | None:
    """``auto`` -> None; else a residual index in ``0..L``."""
    if spec is None or str(spec).strip().lower() == "auto":
        return None
    try:
        value = int(str(spec).strip())
    except ValueError:
        fail(f"{what} must be auto or a residual index 0..{num_indices - 1}, got {spec!r}")
    if not 0 <= value < num_indices:
        fail(f"{what} {value} is out of range: residual indices are 0..{num_indices - 1}")
    return value


def parse_targets(spec: str) -> tuple[str, ...]:
    names = [t.strip() for t in str(spec).split(",") if t.strip()]
    unknown = [t for t in names if t not in ROLES]
    if unknown or not names:
        fail(f"ablate.targets: unknown target {unknown[0] if unknown else spec!r}; choose from {', '.join(ROLES)}")
    return tuple(sorted(set(names), key=ROLES.index))


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


def resolve_layer_edits(layers: list[int], measurement: int | float, scale: float, sparsity: float,
                        overrides: list[dict], num_layers: int,
                        base_edits: list[LayerEdit] | None = None) -> list[LayerEdit]:
    """Per-layer settings: defaults for ``layers`` (or ``base_edits``, e.g. a searched trial's),
    replaced or extended by ``overrides``."""
    num_indices = num_layers + 1
    if not 0.0 <= sparsity < 1.0:
        fail(f"ablate.sparsity must be in [0, 1), got {sparsity}")
    by_layer: dict[int, list[LayerEdit]] = {k: [LayerEdit(k, measurement, float(scale), float(sparsity))] for k in layers}
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
        if layer not in replaced:
            by_layer[layer], replaced = [], replaced | {layer}
        by_layer[layer].append(LayerEdit(layer, measurement if m is None else m, s, sp))
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
    from stages.score import index_scores

    score = _read_scores(scores)
    best = int(score["best_index"])
    if not 0 <= best <= num_layers or int(score.get("num_layers", num_layers)) != num_layers:
        fail(f"{scores} is for another model (best index {best}, {score.get('num_layers')} layers); rerun score")
    return auto_layers(index_scores(tensors), best, fraction, num_layers), best


def _read_yaml_shards(path: Path) -> dict[str, str]:
    import yaml

    try:
        shards = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("shards")
    except (OSError, yaml.YAMLError, AttributeError) as exc:
        fail(f"cannot read the shard list in {path} ({exc}); run `abliterate use SOURCE` again")
    if not isinstance(shards, dict) or not shards:
        fail(f"{path} has no `shards:` table; run `abliterate use SOURCE` again")
    return {str(k): str(v) for k, v in shards.items()}


def _read_scores(path: Path | None) -> dict:
    import json

    if path is None or not Path(path).is_file():
        fail(f"scores file {path} does not exist; run `dvc repro score` (needed for auto layers/measurement)")
    try:
        return json.loads(Path(path).read_text())
    except ValueError as exc:
        fail(f"{path} is not valid JSON ({exc}); rerun `dvc repro score`")


def plan(model: Path, shards_file: Path, directions: Path, scores: Path | None, out: Path, layers: str = "auto",
         measurement: str = "auto", scale: float = 1.0, norm_preserve: bool = True, projected: bool = True,
         sparsity: float = 0.0, targets: str = "attention,mlp,experts,shared-experts", auto_fraction: float = 0.5,
         overrides_from: str = "", search: Path | None = None) -> dict:
    """Resolve the settings, build every shard's edits and write ``out/<key>.json`` + settings."""
    from stages.atomic import atomic_path, dumps_json
    from stages.modelio import check_model_dir, read_config, text_config, weight_map
    from stages.edits import build_edits, shard_documents
    from stages.reduce import load_directions

    check_model_dir(model)
    config = text_config(read_config(model))
    num_layers = int(config.get("num_hidden_layers", 0))
    shards = _read_yaml_shards(shards_file)
    names = weight_map(model)
    if sorted(set(names.values())) != sorted(shards.values()):
        fail(f"{shards_file} lists shards {sorted(shards.values())} but {model} holds {sorted(set(names.values()))}; "
             "the shard list is out of date: run `abliterate use SOURCE` again")
    tensors, _ = load_directions(directions)
    num_indices = num_layers + 1
    if f"direction.{num_layers}" not in tensors or f"direction.{num_indices}" in tensors:
        found = sum(1 for n in tensors if n.startswith("direction."))
        fail(f"{directions} holds {found} residual indices but {model} has {num_layers} layers "
             f"({num_indices} indices); rerun `dvc repro reduce` for this model")
    target_roles = parse_targets(targets)
    searched = None
    if str(layers).strip().lower() == "search":
        from stages.search import chosen_layer_edits

        searched = chosen_layer_edits(search, directions, num_layers, norm_preserve=norm_preserve,
                                      projected=projected, sparsity=sparsity, targets=target_roles)
    layer_list = [] if searched is not None else parse_layers(layers, num_layers)
    m = parse_index(measurement, num_indices, "ablate.measurement")
    if searched is not None and m is None:
        m = searched["measurement"]
    if layer_list is None or m is None:
        auto_list, best = default_layers(scores, tensors, auto_fraction, num_layers)
        m = best if m is None else m
        layer_list = auto_list if layer_list is None else layer_list
    layer_edits = resolve_layer_edits(layer_list, m, scale, sparsity, load_overrides(overrides_from), num_layers,
                                      base_edits=None if searched is None else searched["edits"])
    options = {"norm_preserve": norm_preserve, "projected": projected, "targets": list(target_roles)}
    edits, arch = build_edits(model, names, config, tensors, layer_edits, options,
                              default=LayerEdit(-1, m, float(scale), float(sparsity)))
    documents = shard_documents(edits, shards, int(config["hidden_size"]), FORMAT)
    settings = {
        "format": FORMAT, "architecture": arch, "model_type": config.get("model_type"), "num_layers": num_layers,
        "hidden_size": int(config["hidden_size"]), "layers": [layer_edit_dict(e) for e in layer_edits],
        "defaults": {"layers": str(layers), "measurement": m, "scale": float(scale), "sparsity": float(sparsity),
                     "auto_fraction": float(auto_fraction), "overrides_from": overrides_from, **options},
        "shards": dict(sorted(shards.items())),
        "edited_tensors": {k: len({e["tensor"] for e in d["edits"]}) for k, d in sorted(documents.items())},
    }
    if searched is not None:
        settings["search"] = searched["source"]
    if SETTINGS_FILE[:-5] in shards:
        fail(f"model.yaml uses the reserved shard key {SETTINGS_FILE[:-5]!r}; run `abliterate use SOURCE` again")
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for key, doc in documents.items():
            (tmp / f"{key}.json").write_text(dumps_json(doc), encoding="utf-8")
        (tmp / SETTINGS_FILE).write_text(dumps_json(settings), encoding="utf-8")
    _report(layer_edits, edits, settings)
    return settings


def _report(layer_edits: list[LayerEdit], edits: list[dict], settings: dict) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title=f"plan: {settings['architecture']} ({settings['model_type']})", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    roles = [r for r in ROLES if any(e["role"] == r for e in edits)]
    for header in ("layer", "measurement", "scale", "sparsity", *roles):
        table.add_column(header, justify="right", no_wrap=True)
    for e in layer_edits:
        counts = [sum(1 for x in edits if x["layer"] == e.layer and x["role"] == r and x["measurement"] == e.measurement
                      and x["scale"] == e.scale and x["sparsity"] == e.sparsity
                      and (e.roles is None or r in e.roles)) for r in roles]
        table.add_row(str(e.layer), f"{e.measurement:.4g}" if isinstance(e.measurement, float) else str(e.measurement),
                      f"{e.scale:.4g}", f"{e.sparsity:g}", *map(str, counts))
    if any(e["layer"] is None for e in edits):
        table.add_row("embeddings", "", "", "", *[str(sum(1 for x in edits if x["layer"] is None and x["role"] == r))
                                                  for r in roles])
    log = console()
    if not log.is_terminal:
        log.width = max(log.width, 120)  # logs (dvc repro, CI) get the whole table
    log.print(table)
    touched = sum(1 for v in settings["edited_tensors"].values() if v)
    log.print(f"plan: {len(edits)} edits in {touched} of {len(settings['shards'])} shards")


@app.command()
def main(
    model: Annotated[Path, typer.Option(help="Base model folder (config.json, index, shards).")],
    shards: Annotated[Path, typer.Option(help="model.yaml with the `shards:` table.")],
    directions: Annotated[Path, typer.Option(help="directions.safetensors written by reduce.")],
    out: Annotated[Path, typer.Option(help="Output folder: one <shard key>.json per shard.")],
    scores: Annotated[Path, typer.Option(help="metrics/layers.json (for auto layers/measurement).")] = None,
    layers: Annotated[str, typer.Option(help="auto | search | 8-20 | 3,5,8-12 | 12 (decoder layers, ranges "
                                        "inclusive); auto: every layer touching the run of residual indices around "
                                        "the best one with quality >= auto-fraction x best; search: the trial the "
                                        "search stage chose (--search).")] = "auto",
    measurement: Annotated[str, typer.Option(help="auto (best scored) or a residual index 0..L.")] = "auto",
    scale: Annotated[float, typer.Option(help="1 removes, 0 keeps, negative adds the direction back.")] = 1.0,
    norm_preserve: Annotated[str, typer.Option(help="true: keep every written column's norm.")] = "true",
    projected: Annotated[str, typer.Option(help="true: biprojection against harmless means at m and k+1.")] = "true",
    sparsity: Annotated[float, typer.Option(help="Fraction of the smallest direction components zeroed.")] = 0.0,
    targets: Annotated[str, typer.Option(help=f"Comma list of {', '.join(ROLES)}.")] = "attention,mlp,experts,shared-experts",
    auto_fraction: Annotated[float, typer.Option(help="layers auto: quality >= this fraction of the best.")] = 0.5,
    overrides_from: Annotated[str, typer.Option(help="FILE:KEY (dotted key) of a YAML list in llm-abliteration's "
                                                "shape - {layer, measurement, scale, sparsity} (defaults: "
                                                "--measurement, 1.0, 0.0); entries replace their layer's defaults "
                                                "and add layers. E.g. params.yaml:ablate.overrides or "
                                                "mycfg.yml:ablate.")] = "",
    search: Annotated[Path, typer.Option(help="search.json written by the search stage (read with --layers "
                                         "search only).")] = None,
) -> None:
    """Decide every tensor edit, one deterministic JSON per shard (an empty edit list for untouched shards)."""
    plan(model, shards, directions, scores, out, layers=layers, measurement=measurement, scale=scale,
         norm_preserve=parse_bool(norm_preserve, "--norm-preserve"), projected=parse_bool(projected, "--projected"),
         sparsity=sparsity, targets=targets, auto_fraction=auto_fraction, overrides_from=overrides_from,
         search=search)


if __name__ == "__main__":
    run_app(app)
