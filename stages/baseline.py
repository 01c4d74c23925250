"""Stage ``baseline``: the base model's greedy answers and log-probabilities on the held-out eval prompts.

Computed by :func:`abliterate.evaluation.build_baseline`, written as
:mod:`abliterate.formats.baseline_table` (``artifacts/baseline.parquet``), which ``evaluate``
reads with everything it needs.
"""

from __future__ import annotations

from pathlib import Path

import typer

from stages.cliutil import console, new_app, reporter, run_app

app = new_app(__doc__.splitlines()[0])


def _log_summary(summary: list[dict], seconds: float, out: Path) -> None:
    from rich.table import Table

    table = Table(title=f"baseline: {out}", title_justify="left")
    for column in ("set", "prompts", "refused", "empty answers", "mean tokens"):
        table.add_column(column, justify="left" if column == "set" else "right")
    for row in summary:
        table.add_row(row["set"], str(row["prompts"]), str(row["refused"]), str(row["empty"]),
                      f"{row['mean_tokens']:.1f}")
    console().print(table)
    empty, total = sum(r["empty"] for r in summary), sum(r["prompts"] for r in summary)
    if empty:
        reporter().message(f"warning: the base model generated nothing for {empty} of {total} prompts "
                           "(counted as refusals)")
    reporter().message(f"baseline: {total} prompts in {seconds:.1f} s")


@app.command()
def main(
    model: Path = typer.Option(..., help="Base model folder (Hugging Face layout)."),
    harmful: str = typer.Option(..., help="Held-out harmful prompts (refusal rate)."),
    harmless: str = typer.Option(..., help="Held-out plain harmless prompts (KL)."),
    borderline: str = typer.Option("", help="Held-out borderline prompts, edgy but harmless (over-refusal; '' = none)."),
    out: Path = typer.Option(..., help="Output parquet file."),
    max_new_tokens: int = typer.Option(48, help="Greedy tokens generated per prompt."),
    kl_tokens: int = typer.Option(16, help="Answer tokens along which the KL reference is stored."),
    batch_size: int = typer.Option(16, help="Prompts per batch."),
    dtype: str = typer.Option("auto", help="auto (float32 on CPU, the checkpoint's on a GPU), checkpoint, float32, bfloat16, float16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, mps."),
    streaming: str = typer.Option("auto", help="on: one decoder layer in memory at a time; off: the whole model; "
                                               "auto: on when it does not fit."),
    system_prompt: str = typer.Option("", help="System prompt rendered before every prompt."),
    chat_template: str = typer.Option("", help="Jinja chat template file for models without one."),
    top_k: int = typer.Option(256, help="Tokens kept per answer position for the answer KL (a lower bound)."),
    max_prompt_tokens: int = typer.Option(4096, help="Longest rendered prompt accepted, in tokens (the model's "
                                                     "context less --max-new-tokens also caps it)."),
) -> None:
    """The base model's greedy answers and log-probabilities on the held-out eval prompts."""
    import time

    from abliterate.baseline import build_baseline

    start = time.perf_counter()
    _, summary = build_baseline(model, harmful, harmless, out, borderline=borderline or None,
                                max_new_tokens=max_new_tokens, kl_tokens=kl_tokens,
                                batch_size=batch_size, dtype=dtype, device=device, streaming=streaming, system_prompt=system_prompt,
                                chat_template=chat_template, top_k=top_k, max_prompt_tokens=max_prompt_tokens,
                                report=reporter())
    _log_summary(summary, time.perf_counter() - start, out)


if __name__ == "__main__":
    run_app(app, stage="stages.baseline")
