"""reduce: fp64 means per residual index and the refusal direction (harmful - harmless).

Reads the two activation parquets row group by row group (memory: one row group) and writes
``artifacts/directions.safetensors`` (:mod:`abliterate.formats.directions`; the math is in
:mod:`abliterate.reduction`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.cliutil import new_app, parse_bool, reporter, run_app

app = new_app(__doc__.split("\n")[0])


@app.command()
def main(
    harmful: Annotated[Path, typer.Option(help="Activations of the harmful prompts (parquet).")],
    harmless: Annotated[Path, typer.Option(help="Activations of the harmless prompts (parquet).")],
    out: Annotated[Path, typer.Option(help="Output directions.safetensors.")],
    winsorize: Annotated[float, typer.Option(help="Clamp each vector at this quantile of its |values| (1.0 = off).")] = 1.0,
    orthogonalize: Annotated[str, typer.Option(
        help="true: unit directions orthogonal to the harmless mean of the same index.")] = "false",
) -> None:
    """Average the activations in fp64 and compute the refusal direction at every residual index."""
    from abliterate.reduction import reduce

    tensors, metadata = reduce(harmful, harmless, out, winsorize=winsorize,
                               orthogonalize=parse_bool(orthogonalize, "--orthogonalize"))
    reporter().message(
        f"reduce: {metadata['num_indices']} residual indices, {int(tensors['count.harmful'][0])} harmful / "
        f"{int(tensors['count.harmless'][0])} harmless vectors -> {out}")


if __name__ == "__main__":
    run_app(app, stage="stages.reduce")
