"""The search space of the ``search`` stage: a measurement and one layer kernel per component.

With ``L`` decoder layers (residual indices ``0..L``), a trial has nine numbers and two choices:

* ``measurement`` in ``[0.2 L, 0.9 L]`` (at least 1): the residual index whose direction is removed; a
  fractional index interpolates the unit directions of the two indices around it (then
  renormalized, see ``abliterate.edits.direction_at``);
* per component (``attention``: the attention writers ``o_proj`` / ``out_proj``; ``mlp``: the MLP
  writers ``down_proj``, experts and shared experts), a linear tent over the layers:
  ``{c}_peak`` in ``[0.2, 1.0] (L - 1)`` (the layer with the largest weight), ``{c}_width`` in
  ``[1, 0.6 (L - 1)]`` (how far the tent reaches), ``{c}_weight`` (the scale at the peak; attention
  ``[0.5, 3.5]``, MLP ``[-0.25, 1.5]`` clamped at 0 so the search can switch the MLP edit off) and
  ``{c}_edge`` in ``[0, 1]`` (the weight at the tent's edge, as a fraction of the peak weight).
  Layer ``k`` at distance ``d = |k - peak| <= width`` gets scale ``weight (1 - (d / width)(1 - edge))``;
  layers beyond the width are not edited;
* per component, ``{c}_scope``: ``global`` (every layer removes the direction at ``measurement``)
  or ``per-layer`` (layer ``k`` removes the direction at ``k + 1``, the residual it writes into).
  Measured on both demo models, per-layer attention edits with a scale well above 1 removed far
  more refusals per unit of KL than any global direction, and MLP edits added KL without removing
  refusals (README, "Choosing the default"); the search may find otherwise on another model.

There is no separate global scale: it would only multiply both peak weights, which the search
already sets freely. The kernel shape follows heretic's published parameterization; the ranges are
a little wider on the early side, since small models carry the refusal direction earlier.
"""

from __future__ import annotations

from abliterate.records import LayerEdit

VERSION = 3  # bump when the space or the kernel changes: old study journals no longer apply
COMPONENTS = {"attention": ("attention",), "mlp": ("mlp", "experts", "shared-experts")}
WEIGHT_RANGE = {"attention": (0.5, 3.5), "mlp": (-0.25, 1.5)}
SCOPES = ("global", "per-layer")
SEARCHABLE = {role for roles in COMPONENTS.values() for role in roles}


def ranges(num_layers: int) -> dict[str, tuple[float, float]]:
    """Every parameter's ``(low, high)`` for a model of ``num_layers`` decoder layers."""
    last = max(num_layers - 1, 0)
    # index 0 (the embeddings of the template's last token, the same for every prompt) has no direction
    space = {"measurement": (max(0.2 * num_layers, 1.0), max(0.9 * num_layers, 1.0))}
    for c in COMPONENTS:
        space[f"{c}_peak"] = (0.2 * last, 1.0 * last)
        space[f"{c}_width"] = (1.0, max(1.5, 0.6 * last))
        space[f"{c}_weight"] = WEIGHT_RANGE[c]
        space[f"{c}_edge"] = (0.0, 1.0)
    return space


def suggest(trial, num_layers: int) -> dict[str, float | str]:
    """Ask an Optuna trial for one point of the space (names sorted, so the order is fixed)."""
    point: dict[str, float | str] = {name: float(trial.suggest_float(name, low, high))
                                     for name, (low, high) in sorted(ranges(num_layers).items())}
    for c in COMPONENTS:
        point[f"{c}_scope"] = trial.suggest_categorical(f"{c}_scope", SCOPES)
    return dict(sorted(point.items()))


def start_point(layers: list[int], measurement: float, scale: float, num_layers: int,
                scope: str = "global") -> dict[str, float | str]:
    """The point of the space that is the default ablation: ``scale`` on ``layers`` (contiguous) for both components.

    A flat tent (edge 1) centred on the range, reaching its ends. Values outside the space are
    clamped to it (then the point only approximates the default; :func:`layer_scales` tells which)."""
    space = ranges(num_layers)
    low, high = min(layers), max(layers)
    point: dict[str, float | str] = {"measurement": float(measurement)}
    for c in COMPONENTS:
        point.update({f"{c}_peak": (low + high) / 2, f"{c}_width": max((high - low) / 2, 1.0),
                      f"{c}_weight": float(scale), f"{c}_edge": 1.0 if high > low else 0.0})
    clamped = {k: min(max(v, space[k][0]), space[k][1]) for k, v in point.items()}
    return dict(sorted({**clamped, **{f"{c}_scope": scope for c in COMPONENTS}}.items()))


def component_roles(targets) -> dict[str, tuple[str, ...]]:
    """The targeted roles of each component (components without any are left out)."""
    found = {}
    for component, roles in COMPONENTS.items():
        kept = tuple(r for r in roles if r in targets)
        if kept:
            found[component] = kept
    return found


def layer_scales(params: dict[str, float], component: str, num_layers: int) -> dict[int, float]:
    """Layer -> scale of one component's tent (layers with scale 0 left out)."""
    peak, width = params[f"{component}_peak"], params[f"{component}_width"]
    weight = max(params[f"{component}_weight"], 0.0)
    edge = params[f"{component}_edge"]
    scales = {}
    for k in range(num_layers):
        d = abs(k - peak)
        if d <= width and weight > 0.0:
            scale = weight * (1.0 - (d / width) * (1.0 - edge))
            if scale > 0.0:
                scales[k] = scale
    return scales


def kernel(params: dict[str, float], num_layers: int, sparsity: float, roles: dict[str, tuple[str, ...]],
           layers_with: dict[str, set[int]]) -> list[LayerEdit]:
    """The per-layer, per-component settings of one trial, in layer order (attention, then MLP).

    ``roles``: component -> its targeted roles (:func:`component_roles`); ``layers_with``:
    component -> the layers that have a tensor of those roles (a layer without any is skipped).
    """
    m = float(params["measurement"])
    edits = []
    for component, kept in roles.items():
        per_layer = params.get(f"{component}_scope", "global") == "per-layer"
        for k, scale in layer_scales(params, component, num_layers).items():
            if k in layers_with.get(component, set()):
                edits.append(LayerEdit(k, k + 1 if per_layer else m, float(scale), float(sparsity), kept))
    order = list(COMPONENTS)
    return sorted(edits, key=lambda e: (e.layer, order.index(next(c for c, r in roles.items() if r == e.roles))))


def pareto_front(points: dict[int, tuple[float, float]]) -> set[int]:
    """Keys of the points no other point beats in both objectives (both minimized)."""
    front = set()
    for key, (a, b) in points.items():
        dominated = any((x <= a and y <= b) and (x < a or y < b) for other, (x, y) in points.items() if other != key)
        if not dominated:
            front.add(key)
    return front
