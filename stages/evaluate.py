"""Stage ``evaluate``: the ablated model against the baseline -- refusal rates, over-refusal, KL, a report.

The metrics are :mod:`abliterate.evaluation`'s (see there for each number and the
heretic-compatible line); ``reports/eval.md`` is :mod:`abliterate.report`'s. ``--compare FILE``
adds the numbers of another evaluate run (its ``metrics/eval.json``, e.g. of the default heuristic
before a searched ablation) as a column of the report's tables, labelled ``--compare-label``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from stages.cliutil import console, new_app, reporter, run_app

app = new_app(__doc__.splitlines()[0])


def _log(metrics: dict, seconds: float) -> None:
    from rich.table import Table

    table = Table(title="evaluate", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(metrics.items()):
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console().print(table)
    if metrics["empty_answers_after"]:
        reporter().message(f"warning: the ablated model generated nothing for {metrics['empty_answers_after']} "
                           "prompts (counted as refusals)")
    reporter().message(f"evaluate: done in {seconds:.1f} s")


@app.command()
def main(
    model: Path = typer.Option(..., help="Ablated model folder (Hugging Face layout)."),
    baseline: Path = typer.Option(..., help="Baseline parquet written by the baseline stage."),
    metrics: Path = typer.Option(..., help="Output metrics JSON."),
    report: Path = typer.Option(..., help="Output Markdown report."),
    batch_size: int = typer.Option(16, help="Prompts per batch."),
    dtype: str = typer.Option("auto", help="auto (float32 on CPU, the checkpoint's on a GPU), checkpoint, float32, bfloat16, float16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, mps."),
    streaming: str = typer.Option("auto", help="on: one decoder layer in memory at a time; off: the whole model; "
                                               "auto: on when it does not fit."),
    compare: str = typer.Option("", help="metrics/eval.json of another run, shown beside this one in the report."),
    compare_label: str = typer.Option("", help="Column title of --compare (default: its file name)."),
) -> None:
    """Refusal rates before/after, over-refusal, first-token and answer KL of the ablated model; a report."""
    import time

    from abliterate.evaluation import evaluate

    start = time.perf_counter()
    result = evaluate(model, baseline, metrics, report, batch_size=batch_size, dtype=dtype, device=device,
                      streaming=streaming, compare=compare, compare_label=compare_label, report=reporter())
    _log(result, time.perf_counter() - start)


if __name__ == "__main__":
    run_app(app, stage="stages.evaluate")
