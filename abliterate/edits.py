"""Building the edits of an ablation from the model: which tensor, which direction, which vector, how.

:func:`build_edits` (used by ``plan`` and by the search's live edits) makes every check that needs
the model's tensor names, dtypes and shapes: unknown architectures, quantization methods that
cannot be edited in place (FP8, MXFP4 and NVFP4 targets get a storage record instead:
:mod:`abliterate.quant.registry`), tied embeddings, writer-like tensors the table does not know in
a layer that is to be edited, layers without any targeted tensor, and shapes whose residual axis is
not ``hidden``.

A setting's measurement may be fractional (the search stage proposes them): ``m = i + t`` with
``0 < t < 1`` takes ``normalize((1 - t) unit.i + t unit.(i+1))`` and, for biprojection, the
harmless mean interpolated the same way. A setting with ``roles`` edits only those roles of its
layer (the search sets attention and MLP writers separately); ``None`` edits every targeted role.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from abliterate.errors import fail
from abliterate.linalg import fold_gain, layer_direction, unit
from abliterate.records import AblationOptions, Edit, LayerEdit
from abliterate.targets import Match, check_storable, gain_name, match_tensors, quantized_twin


def build_edits(model: Path, names: dict[str, str], config: dict, directions: dict, layer_edits: list[LayerEdit],
                options: AblationOptions, default: LayerEdit) -> tuple[list[Edit], str]:
    """Every edit, in application order, and the architecture's name.

    ``names``: tensor -> shard file; ``directions``: the reduce tensors (``unit.{i}``,
    ``harmless_mean.{i}``, ...); ``layer_edits``: resolved per-layer settings; ``default``: the
    setting used for the embeddings.
    """
    from abliterate.formats.safetensors_io import read_header
    from abliterate.quant.registry import method_of, quantized_target

    qc = method_of(model)  # refuses, in one line, quantization methods that cannot be edited in place
    arch, prefix, matches, unmatched = match_tensors(names, config)
    hidden = int(config["hidden_size"])
    size = directions["direction.0"].numel()
    if size != hidden:
        fail(f"the directions have hidden size {size} but the model has {hidden}; "
             "they were measured on another model: rerun `dvc repro reduce` for this one")
    roles = set(options.targets)
    headers = {f: read_header(Path(model) / f) for f in sorted(set(names.values()))}
    info = {n: headers[f].tensors[n] for n, f in names.items()}
    wanted = {e.layer for e in layer_edits if e.scale != 0}
    for name in unmatched:
        layer = int(name[len(prefix) + len("layers."):].split(".", 1)[0])
        twin = quantized_twin(name)
        twin_match = next((m for m in matches if m.name == twin), None) if twin else None
        if twin and twin_match is None:
            _, _, more, _ = match_tensors([twin], config)
            twin_match = more[0] if more else None
            if twin_match is not None and quantized_target(twin, twin_match.rule.layout, names, info, qc):
                matches.append(twin_match)  # stored quantized (e.g. MXFP4 x_blocks/x_scales): edited as such
                continue
        elif twin_match is not None and quantized_target(twin, twin_match.rule.layout, names, info, qc):
            continue  # the scale of a quantized target the table matched
        if layer not in wanted:
            continue
        if twin_match is not None and twin_match.rule.role not in roles:
            continue
        if twin_match is not None:
            fail(f"tensor {twin} of layer {layer} is stored quantized ({name}, {info[name].dtype}); editing "
                 f"quantized tensors is not supported yet: use a bf16/fp16/fp32 checkpoint of this {arch.name} model")
        fail(f"tensor {name} of layer {layer} looks like a residual writer but the {arch.name} table has no rule for "
             "it; refusing to skip it silently: report it, or leave this layer out of ablate.layers")
    by_layer: dict[int | None, list[Match]] = defaultdict(list)
    for match in matches:
        if match.rule.role in roles:
            by_layer[match.layer].append(match)
    cache: dict = {}

    def direction(m: float, writes_into: int, sparsity: float):
        key = (m, writes_into, sparsity)
        if key not in cache:
            measured, harmless = direction_at(directions, m)
            against = [harmless, directions[f"harmless_mean.{writes_into}"]] if options.projected else []
            cache[key] = layer_direction(measured, against, sparsity)
        return cache[key]

    gains: dict = {}

    def gain(match: Match):
        gname = gain_name(match, prefix)
        if gname is None:
            return None, None
        if gname not in gains:
            if gname not in names:
                fail(f"norm {gname} (the gain of {match.name}) is missing from the checkpoint; is the model complete?")
            from safetensors import safe_open

            with safe_open(str(Path(model) / names[gname]), framework="pt") as handle:
                weight = handle.get_tensor(gname).double().flatten()
            if weight.numel() != hidden:
                fail(f"norm {gname} has {weight.numel()} values, expected {hidden}")
            gains[gname] = weight + arch.gain_offset
        return gname, gains[gname]

    def add(match: Match, setting: LayerEdit, r) -> Edit:
        quantized = quantized_target(match.name, match.rule.layout, names, info, qc)
        storage, dtype, shape, file = quantized or (None, info[match.name].dtype, tuple(info[match.name].shape),
                                                    names[match.name])
        if quantized is None:
            check_storable(match, dtype, set(names), arch)
        ok = (len(shape) == 2 and shape[0] == hidden) if match.rule.layout == "columns" else (shape and shape[-1] == hidden)
        if not ok:
            fail(f"tensor {match.name} has shape {list(shape)}; its residual axis should have size {hidden} "
                 f"({match.rule.layout} layout): the {arch.name} table does not fit this checkpoint")
        gname, g = gain(match)
        return Edit(
            tensor=match.name, file=file, role=match.rule.role, layer=match.layer,
            layout=match.rule.layout, bias=match.rule.bias, norm_preserve=options.norm_preserve and not match.rule.bias,
            scale=float(setting.scale), measurement=index_value(setting.measurement),
            sparsity=float(setting.sparsity), projected=options.projected, direction=r.numpy(),
            vector=fold_gain(r, g).numpy(), gain=gname, gain_offset=float(arch.gain_offset) if gname else 0.0,
            dtype=dtype, shape=shape, storage=storage,
        )

    edits: list[Edit] = []
    if "embeddings" in roles and default.scale != 0:
        lm_head = any(n.endswith("lm_head.weight") for n in names)
        if config.get("tie_word_embeddings", True) or not lm_head:
            fail("the embeddings are tied to the output head (tie_word_embeddings): editing them would change every "
                 "output logit too; drop embeddings from ablate.targets")
        for match in by_layer[None]:
            edits.append(add(match, default, direction(default.measurement, 0, default.sparsity)))
    for setting in layer_edits:
        only = setting.roles
        found = [x for x in by_layer[setting.layer] if only is None or x.rule.role in only]
        if not found:
            present = sorted({m.rule.role for m in matches if m.layer == setting.layer})
            wanted_roles = sorted(roles if only is None else roles & set(only))
            fail(f"layer {setting.layer} has no tensor for targets {', '.join(wanted_roles) or 'none'} in this "
                 f"{arch.name} model (it has: {', '.join(present) or 'nothing known'}); change ablate.targets or "
                 "ablate.layers")
        if setting.scale == 0:
            continue
        r = direction(setting.measurement, setting.layer + 1, setting.sparsity)
        edits.extend(add(match, setting, r) for match in found)
    return edits, arch.name


def index_value(m) -> int | float:
    """A measurement as stored in a plan: an int when it is a whole index, else the float itself."""
    value = float(m)
    return int(value) if value.is_integer() else value


def direction_at(directions: dict, m: float):
    """``(measured direction, harmless mean)`` at residual index ``m``, which may be fractional.

    Whole ``m``: ``unit.m`` (``direction.m`` in files without it) and ``harmless_mean.m``.
    ``m = i + t``: ``(1 - t) unit.i + t unit.(i+1)`` of the two unit directions (renormalized
    later by :func:`abliterate.linalg.layer_direction`) and the harmless means mixed alike.
    """
    import math

    value = float(m)
    low = math.floor(value)
    t = value - low

    def measured(i: int):
        raw = directions.get(f"unit.{i}", directions[f"direction.{i}"])
        return raw, unit(raw, f"direction at residual index {i}")

    if t == 0.0:  # exactly what a whole index always gave (the raw tensor: same bytes as before)
        return measured(low)[0], directions[f"harmless_mean.{low}"]
    if f"direction.{low + 1}" not in directions:
        fail(f"measurement {value} lies past the last residual index {low}; use an index 0..{low}")
    mixed = (1.0 - t) * measured(low)[1] + t * measured(low + 1)[1]
    means = (directions[f"harmless_mean.{low}"].double(), directions[f"harmless_mean.{low + 1}"].double())
    harmless = (1.0 - t) * means[0] + t * means[1]
    return mixed, harmless
