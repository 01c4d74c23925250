"""verify: check an ablated model against its base model, tensor by tensor.

``abliterate verify BASE ABLATED``: the checks and tolerances are :mod:`abliterate.verification`'s.
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
    tolerance: Annotated[float, typer.Option(help="Max relative component / norm drift (0 = by dtype).")] = 0.0,
) -> None:
    """Check an ablated model against its base: untouched bytes, kept norms, no write along r."""
    from rich import box
    from rich.table import Table

    from abliterate.verification import verify

    rows, passed = verify(base, ablated, tolerance)
    table = Table(title=f"verify {ablated} against {base}", title_justify="left", box=box.SIMPLE_HEAD)
    for header in ("check", "max |write . r| / |write|", "max norm drift", "status"):
        table.add_column(header, justify="left" if header == "check" else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row, style=None if row[-1] == "ok" else "bold red")
    wide_table(table)
    reporter().message("verify: all checks passed" if passed else "verify: some checks FAILED")
    if not passed:
        sys.exit(1)


if __name__ == "__main__":
    run_app(app)
