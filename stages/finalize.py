"""finalize: provenance (abliteration.json) and a model card for the ablated model.

Writes only ``<out>/abliteration.json`` (:mod:`abliterate.formats.provenance`) and
``<out>/README.md`` (:mod:`abliterate.model_card`). The weight shards come from the
``ablate@<shard>`` stages and the other files of the folder from the ``carry@<file>`` stages: DVC
needs every output listed statically, so each carried file is its own stage driven by ``model.yaml``.
``abliterate verify BASE ABLATED`` reads the provenance back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.cliutil import new_app, reporter, run_app

app = new_app(__doc__.split("\n")[0])


@app.command()
def main(
    base: Annotated[Path, typer.Option(help="Base model folder (models/base).")],
    plan: Annotated[Path, typer.Option(help="Plan folder written by plan (artifacts/plan).")],
    directions: Annotated[Path, typer.Option(help="directions.safetensors (hashed into the provenance).")],
    out: Annotated[Path, typer.Option(help="The ablated model folder (artifacts/model).")],
) -> None:
    """Write abliteration.json (provenance) and README.md (model card) into the ablated model folder."""
    from abliterate.finalize import finalize

    finalize(base, plan, directions, out, report=reporter())


if __name__ == "__main__":
    run_app(app)
