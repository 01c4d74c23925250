"""Plan an ablation: resolve the settings and decide every tensor edit, one document per shard.

For each decoder layer ``k`` to edit and each of its settings ``(measurement m, scale s,
sparsity)``: ``r = unit.m`` from the directions, with biprojection (``projected``) orthogonalized
jointly (QR, fp64) against the unit harmless means at ``m`` and ``k + 1`` (the residual layer
``k`` writes into), then sparsified; each targeted tensor of layer ``k`` gets ``u = normalize(g *
r)`` where a norm gain ``g`` sits in between (see :mod:`abliterate.targets`). Embeddings (an
optional target) write into residual index 0 and use the default measurement, scale and sparsity.
``scale = 0`` settings are dropped. Embeddings tied to the output head (``tie_word_embeddings``)
are refused as a target: editing them would change every output logit as well.

``layers = "search"`` takes the per-layer settings of the trial the search chose (a fractional
measurement and separate attention and MLP scales per layer), ``"search:N"`` those of trial N of
its Pareto front; overrides still apply on top. The
search must have been run with the same options and on the same directions file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from abliterate.errors import fail
from abliterate.records import AblationOptions, Edit, LayerEdit


@dataclass(frozen=True)
class Plan:
    settings: dict  # what _settings.json holds
    layer_edits: list[LayerEdit]  # the resolved per-layer settings
    edits: list[Edit]  # every tensor edit, in application order


def plan(model: Path, shards_file: Path, directions: Path, scores: Path | None, out: Path, *, layers: str = "auto",
         measurement: str = "per-layer", scale: float = 2.5, options: AblationOptions = AblationOptions(),
         auto_fraction: float = 0.5, overrides_from: str = "", search: Path | None = None,
         quantized_edits: str = "requantize") -> Plan:
    """Resolve the settings, build every shard's edits and write ``out/<key>.json`` and the settings."""
    from abliterate.edits import build_edits
    from abliterate.formats.directions import check_indices, load_directions
    from abliterate.formats.model_yaml import read_shards
    from abliterate.formats.plans import FORMAT, write_plan_dir
    from abliterate.formats.search_result import read_chosen, search_pick
    from abliterate.layers import PER_LAYER, default_layers, load_overrides, parse_index, parse_layers
    from abliterate.layers import resolve_layer_edits
    from abliterate.model.modelio import check_model_dir, read_config, text_config, weight_map
    from abliterate.formats.plan_output import OUTPUT_FILE
    from abliterate.quant.expand import output_changes, plan_documents

    check_model_dir(model)
    config = text_config(read_config(model))
    num_layers = int(config.get("num_hidden_layers", 0))
    shards = read_shards(shards_file)
    names = weight_map(model)
    if sorted(set(names.values())) != sorted(shards.values()):
        fail(f"{shards_file} lists shards {sorted(shards.values())} but {model} holds {sorted(set(names.values()))}; "
             "the shard list is out of date: run `abliterate use SOURCE` again")
    tensors, _ = load_directions(directions)
    num_indices = num_layers + 1
    check_indices(tensors, num_layers, directions, model)
    searched = None
    from_search, trial = search_pick(layers)
    if from_search:
        from abliterate.hashing import sha256_file

        searched = read_chosen(search, sha256_file(directions), num_layers, options, trial)
    layer_list = [] if searched is not None else parse_layers(layers, num_layers)
    m = parse_index(measurement, num_indices, "ablate.measurement", per_layer=True)
    if searched is not None and m is None:
        m = searched["measurement"]
    embeddings_m = m  # the embeddings write into index 0, which has no direction of its own: per-layer takes the best
    if layer_list is None or m is None or (m == PER_LAYER and "embeddings" in options.targets):
        auto_list, best = default_layers(scores, tensors, auto_fraction, num_layers)
        m, embeddings_m = (best, best) if m is None else (m, best if m == PER_LAYER else m)
        layer_list = auto_list if layer_list is None else layer_list
    layer_edits = resolve_layer_edits(layer_list, m, scale, options.sparsity, load_overrides(overrides_from),
                                      num_layers, base_edits=None if searched is None else searched["edits"])
    edits, arch = build_edits(model, names, config, tensors, layer_edits, options,
                              default=LayerEdit(-1, embeddings_m, float(scale), float(options.sparsity)))
    edits, documents = plan_documents(model, names, edits, shards, int(config["hidden_size"]), quantized_edits)
    settings = {
        "format": FORMAT, "architecture": arch, "model_type": config.get("model_type"), "num_layers": num_layers,
        "hidden_size": int(config["hidden_size"]), "layers": [e.to_json() for e in layer_edits],
        "defaults": {"layers": str(layers), "measurement": m, "scale": float(scale),
                     "auto_fraction": float(auto_fraction), "overrides_from": overrides_from,
                     "quantized_edits": quantized_edits, **options.to_json()},
        "shards": dict(sorted(shards.items())),
        "edited_tensors": {k: len({e["tensor"] for e in d["edits"]}) for k, d in sorted(documents.items())},
    }
    if searched is not None:
        settings["search"] = searched["source"]
    write_plan_dir(out, documents, settings, {OUTPUT_FILE: output_changes(model, documents)})
    return Plan(settings, layer_edits, edits)
