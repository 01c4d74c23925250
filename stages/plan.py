"""plan: decide every tensor edit, one deterministic JSON per shard.

``artifacts/plan/<shard key>.json`` for every shard of ``model.yaml`` and ``_settings.json``
beside them (:mod:`abliterate.formats.plans`), so ``ablate@<shard>`` needs only its base shard and
its plan file, and a shard whose edits did not change keeps identical bytes (DVC then skips its
ablate stage). The settings and the edit math are :mod:`abliterate.planning`'s and
:mod:`abliterate.layers`'.

``--overrides-from FILE:KEY`` reads a YAML list at the dotted ``KEY`` of ``FILE`` (``FILE`` alone:
the whole file is the list), in llm-abliteration's shape ``- {layer, measurement, scale,
sparsity}``. DVC cannot put a list of dicts on a command line, so the pipeline points this at
``params.yaml:ablate.overrides``; llm-abliteration users can point it at their own config
(``--overrides-from mycfg.yml:ablate``). ``--layers search`` takes the trial the ``search`` stage
chose (``--search artifacts/search.json``), ``--layers search:N`` trial N of its Pareto front; either
must have been searched with this plan's norm-preserve, projected, sparsity and targets (under DVC
it always is: it reads the same keys).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.cliutil import new_app, parse_bool, reporter, run_app, wide_table

app = new_app(__doc__.split("\n")[0])


def _report(layer_edits, edits, settings: dict) -> None:
    from rich import box
    from rich.table import Table

    from abliterate.targets import ROLES

    table = Table(title=f"plan: {settings['architecture']} ({settings['model_type']})", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    roles = [r for r in ROLES if any(e.role == r for e in edits)]
    for header in ("layer", "measurement", "scale", "sparsity", *roles):
        table.add_column(header, justify="right", no_wrap=True)
    for e in layer_edits:
        counts = [sum(1 for x in edits if x.layer == e.layer and x.role == r and x.measurement == e.measurement
                      and x.scale == e.scale and x.sparsity == e.sparsity
                      and (e.roles is None or r in e.roles)) for r in roles]
        table.add_row(str(e.layer), f"{e.measurement:.4g}" if isinstance(e.measurement, float) else str(e.measurement),
                      f"{e.scale:.4g}", f"{e.sparsity:g}", *map(str, counts))
    if any(e.layer is None for e in edits):
        table.add_row("embeddings", "", "", "", *[str(sum(1 for x in edits if x.layer is None and x.role == r))
                                                  for r in roles])
    wide_table(table)
    touched = sum(1 for v in settings["edited_tensors"].values() if v)
    reporter().message(f"plan: {len(edits)} edits in {touched} of {len(settings['shards'])} shards")


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
                                        "search stage chose (--search); search:N: trial N of its Pareto front.")] = "auto",
    measurement: Annotated[str, typer.Option(help="auto (best scored), a residual index 0..L, or per-layer "
                                             "(layer k removes the direction at index k+1).")] = "per-layer",
    scale: Annotated[float, typer.Option(help="1 removes, 0 keeps, above 1 pushes against it, negative adds it "
                                        "back.")] = 2.5,
    norm_preserve: Annotated[str, typer.Option(help="true: keep every written column's norm.")] = "true",
    projected: Annotated[str, typer.Option(help="true: biprojection against harmless means at m and k+1.")] = "true",
    sparsity: Annotated[float, typer.Option(help="Fraction of the smallest direction components zeroed.")] = 0.0,
    targets: Annotated[str, typer.Option(help="Comma list of attention, mlp, experts, shared-experts, router, "
                                         "embeddings.")] = "attention",
    auto_fraction: Annotated[float, typer.Option(help="layers auto: quality >= this fraction of the best.")] = 0.5,
    overrides_from: Annotated[str, typer.Option(help="FILE:KEY (dotted key) of a YAML list in llm-abliteration's "
                                                "shape - {layer, measurement, scale, sparsity} (defaults: "
                                                "--measurement, 1.0, 0.0); entries replace their layer's defaults "
                                                "and add layers. E.g. params.yaml:ablate.overrides or "
                                                "mycfg.yml:ablate.")] = "",
    search: Annotated[Path, typer.Option(help="search.json written by the search stage (read with --layers "
                                         "search only).")] = None,
    quantized_edits: Annotated[str, typer.Option(help="Edited tensors of an FP8/MXFP4/NVFP4 checkpoint: requantize "
                                                 "(back into its format, fresh scales) or bfloat16 (written "
                                                 "unquantized, their modules listed as not to convert).")] = "requantize",
) -> None:
    """Decide every tensor edit, one deterministic JSON per shard (an empty edit list for untouched shards)."""
    from abliterate.records import AblationOptions
    from abliterate.targets import parse_targets
    from abliterate.planning import plan

    options = AblationOptions(norm_preserve=parse_bool(norm_preserve, "--norm-preserve"),
                              projected=parse_bool(projected, "--projected"), sparsity=sparsity,
                              targets=parse_targets(targets))
    result = plan(model, shards, directions, scores, out, layers=layers, measurement=measurement, scale=scale,
                  options=options, auto_fraction=auto_fraction, overrides_from=overrides_from, search=search,
                  quantized_edits=quantized_edits)
    _report(result.layer_edits, result.edits, result.settings)


if __name__ == "__main__":
    run_app(app, stage="stages.plan")
