"""score: rank every residual index by how cleanly it separates harmful from harmless prompts.

The scores and the choice of the best index are :mod:`abliterate.scoring`'s. Writes
``metrics/layers.json`` (flat numbers: best_index, best_quality, ... for ``dvc metrics show`` /
``dvc exp show``), ``plots/layers.csv`` (one row per index, for ``dvc plots show``) and a table
on stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.cliutil import new_app, run_app, wide_table

app = new_app(__doc__.split("\n")[0])


def _print_table(scores: list[dict], best: int) -> None:
    from rich import box
    from rich.table import Table

    from abliterate.formats.metrics import LAYER_COLUMNS

    headers = ("index", "quality", "cos", "snr", "purity", "rot deg", "|harmful|", "|harmless|", "|dir|")
    table = Table(title="score: residual indices (* = best)", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    for header in headers:
        table.add_column(header, justify="right", no_wrap=True)
    for row in scores:
        cells = [f"{row['index']}{'*' if row['index'] == best else ''}"]
        cells += [f"{row[c]:.3g}" for c in LAYER_COLUMNS[1:]]
        table.add_row(*cells, style="bold green" if row["index"] == best else None)
    wide_table(table)


@app.command()
def main(
    directions: Annotated[Path, typer.Option(help="directions.safetensors written by reduce.")],
    metrics: Annotated[Path, typer.Option(help="Output metrics JSON (best index and its scores).")],
    plot: Annotated[Path, typer.Option(help="Output CSV, one row per residual index.")],
    min_depth: Annotated[float, typer.Option(help="Best index chosen among indices >= min-depth * layers.")] = 0.1,
    max_depth: Annotated[float, typer.Option(help="... and <= max-depth * layers.")] = 0.9,
) -> None:
    """Score every residual index (cosine, SNR, quality, purity, rotation) and pick the best."""
    from abliterate.errors import fail
    from abliterate.formats.directions import load_directions
    from abliterate.formats.metrics import write_scores
    from abliterate.scoring import index_scores, pick_best, summary

    tensors, metadata = load_directions(directions)
    scores = index_scores(tensors)
    num_layers = int(metadata.get("num_layers", len(scores) - 1))
    if num_layers != len(scores) - 1:
        fail(f"{directions} says {num_layers} layers but holds {len(scores)} indices; rerun reduce")
    best = pick_best(scores, num_layers, min_depth, max_depth)
    hidden = int(metadata.get("hidden_size", tensors["direction.0"].numel()))
    write_scores(metrics, plot, scores, summary(scores, best, num_layers, hidden))
    _print_table(scores, best)


if __name__ == "__main__":
    run_app(app, stage="stages.score")
