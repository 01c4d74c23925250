"""``artifacts/search.json`` and ``plots/search.csv``: what the search stage found, read by ``plan``.

``search.json`` (:data:`FORMAT`): ``status`` (``skipped`` when ``search.trials`` is 0, ``done`` or
``interrupted``), ``chosen`` (the chosen trial: its per-layer settings, which ``plan --layers
search`` turns into edits), ``pareto``, ``inputs`` (directions hash, model, layer count), ``options``
(the ablation options it was searched with), ``start`` (the default ablation's trial), ``settings``,
``validation``, ``space``, ``base`` and every trial (those of the Pareto front with their per-layer
settings, so that ``ablate.layers: search:N`` can write any of them). Confirmed trials and the base
carry ``over_refusals``: borderline validation prompts refused (null without a borderline set).
``search.csv``: one row per trial (trial, proxy refusals, first-token KL, on the Pareto front,
confirmed refusals, confirmed over-refusals).
"""

from __future__ import annotations

from pathlib import Path

from abliterate.errors import fail
from abliterate.formats.atomic import write_text
from abliterate.formats.jsonfile import read_json, write_json

FORMAT = 1
HOW = "set search.trials, e.g. `dvc exp run -S search.trials=100 -S ablate.layers=search`"


def write_search(doc: dict, out: str | Path, plot: str | Path) -> None:
    """``search.json`` and the per-trial CSV, both atomically."""
    lines = ["trial,refusals,kl,pareto,confirmed,over_refusals"]
    for t in doc.get("trials", []):
        proxy = _cell(t["refusals_proxy"])  # empty: not answered (KL far too high)
        lines.append(f"{t['trial']},{proxy},{t['kl']!r},{int(t['pareto'])},{_cell(t['refusals'])},"
                     f"{_cell(t.get('over_refusals'))}")
    write_text(plot, "\n".join(lines) + "\n")
    write_json(out, doc)


def _cell(count: int | None) -> str:
    return "" if count is None else str(count)


def skipped(reason: str) -> dict:
    """The document of a search that did not run."""
    return {"format": FORMAT, "status": "skipped", "reason": reason, "how": HOW, "trials": []}


def search_pick(spec: str) -> tuple[bool, int | None]:
    """``ablate.layers`` as a search pick: ``search`` -> (True, None), the chosen trial; ``search:N`` ->
    (True, N), trial N of the Pareto front; anything else -> (False, None)."""
    text = str(spec).strip().lower()
    head, colon, tail = text.partition(":")
    if head != "search":
        return False, None
    if not colon:
        return True, None
    if not tail.strip().isdigit():
        fail(f"ablate.layers: cannot read {spec!r}; use search (the chosen trial) or search:N (trial N of the front)")
    return True, int(tail)


def _measurement(doc: dict, trial: int) -> float:
    return float(next(t["params"]["measurement"] for t in doc["trials"] if t["trial"] == trial))


def read_chosen(path: str | Path | None, directions_sha256: str, num_layers: int, options,
                trial: int | None = None) -> dict:
    """The chosen trial of ``search.json`` (or ``trial``: one of its Pareto front, the chosen one or
    the first, the default ablation) as plan's per-layer settings; one line if unusable.

    ``options``: the :class:`abliterate.edits.AblationOptions` of the plan, which must be the
    search's. Returns ``{"edits": [LayerEdit], "measurement": m, "source": {...}}``.
    """
    from abliterate.records import LayerEdit

    doc = read_json(path, "search result", "rerun `dvc repro search`",
                    missing=f"ablate.layers is search: {HOW}")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        fail(f"{path} is not a search result of format {FORMAT}; rerun `dvc repro search`")
    if doc.get("status") == "skipped":
        fail(f"ablate.layers is search, but no search ran (search.trials is 0); {HOW}")
    chosen = doc.get("chosen")
    if trial is not None:
        # the front's trials carry their settings; so do the chosen one and the start (the default ablation)
        known = {t["trial"]: {"trial": t["trial"], "refusals": t["refusals"], "kl": t["kl"],
                              "measurement": t["params"]["measurement"], "layers": t["layers"]}
                 for t in doc.get("trials", []) if t.get("layers") is not None}
        start = doc.get("start")
        if start:
            known.setdefault(start["trial"], {**start, "measurement": _measurement(doc, start["trial"])})
        if chosen:
            known[chosen["trial"]] = chosen
        if trial not in known:
            fail(f"ablate.layers search:{trial}: trial {trial} of {path} is neither on its Pareto front nor the chosen or first one; "
                 f"pick one of {sorted(known)}")
        chosen = known[trial]
    elif not chosen:
        fail(f"no trial in {path} kept the first-token KL within search.kl-budget ({doc['settings']['kl_budget']}); "
             "raise search.kl-budget or run more trials")
    if doc["inputs"]["num_layers"] != num_layers or doc["inputs"]["directions_sha256"] != directions_sha256:
        fail(f"{path} was searched on other directions or another model; rerun `dvc repro search`")
    for key, value in options.to_json().items():
        if doc["options"][key] != value:
            fail(f"{path} was searched with {key.replace('_', '-')} {doc['options'][key]} but ablate asks for "
                 f"{value}; rerun `dvc repro search` (or restore the setting)")
    edits = [LayerEdit.from_json(e) for e in chosen["layers"]]
    source = {"file": str(path), "trial": chosen["trial"], "status": doc["status"], "refusals": chosen["refusals"],
              "validation_prompts": doc["validation"]["harmful"]["count"], "kl": chosen["kl"]}
    return {"edits": edits, "measurement": chosen["measurement"], "source": source}
