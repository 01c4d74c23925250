"""verify: check an ablated model against its base model, tensor by tensor.

``abliterate verify BASE ABLATED [--plan artifacts/plan] [--directions artifacts/directions.safetensors]``
(or ``--from-provenance`` for a model without the pipeline's artifacts): the checks and tolerances
are :mod:`abliterate.verification`'s.
A table goes to stderr; the exit code is 1 if any check fails.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from stages.cliutil import new_app, reporter, run_app, wide_table

app = new_app(__doc__.split("\n")[0])


@app.command()
def main(
    base: Annotated[Path, typer.Argument(help="The base model folder.")],
    ablated: Annotated[Path, typer.Argument(help="The ablated model folder (with abliteration.json).")],
    plan: Annotated[Path, typer.Option(help="The plan folder the model was ablated with.")] = Path("artifacts/plan"),
    directions: Annotated[Path | None, typer.Option(
        help="The directions file the plan was made from (default artifacts/directions.safetensors; "
             "with --from-provenance only if given).")] = None,
    from_provenance: Annotated[bool, typer.Option(
        "--from-provenance", help="A model without the pipeline's artifacts: take the plan from its "
        "abliteration.json (checks the tensors against it, but cannot catch a provenance rewritten with "
        "them).")] = False,
    tolerance: Annotated[float, typer.Option(help="Max relative component / norm drift (0 = by dtype).")] = 0.0,
) -> None:
    """Check an ablated model against its base, the plan and the directions: every edited tensor
    recomputed, untouched bytes and other files identical, provenance as finalize writes it."""
    import os

    from rich import box
    from rich.table import Table

    from abliterate.verification import verify

    # ablate's arithmetic, to the bit: its stage runs single-threaded BLAS (numpy is not imported yet here)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    if directions is None and not from_provenance:
        directions = Path("artifacts/directions.safetensors")
    rows, passed = verify(base, ablated, None if from_provenance else plan, directions, tolerance)
    table = Table(title=f"verify {ablated} against {base}", title_justify="left", box=box.SIMPLE_HEAD)
    for header in ("check", "max |write . r| / |write|", "max norm drift", "status"):
        table.add_column(header, justify="left" if header == "check" else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row, style={"ok": None, "skip": "yellow"}.get(row[-1], "bold red"))
    wide_table(table)
    report = reporter()
    for row in rows:  # each failure (and skipped check) also as one plain line, whatever the table's width
        if row[-1] != "ok":
            label = "FAILED" if row[-1] == "FAIL" else "not checked"
            report.message(f"verify: {label}: {row[0].strip()}" + (f" ({row[1]})" if row[1] else ""))
    report.message("verify: all checks passed" if passed else "verify: some checks FAILED")
    if not passed:
        sys.exit(1)


if __name__ == "__main__":
    run_app(app)
