"""export-refuse: write the measured directions in llm-abliteration's ``.refuse`` layout.

The layout and the index correspondence are :mod:`abliterate.formats.refuse`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.cliutil import new_app, reporter, run_app

app = new_app(__doc__.split("\n")[0])


@app.command()
def main(
    directions: Annotated[Path, typer.Option(help="directions.safetensors written by reduce.")] = Path(
        "artifacts/directions.safetensors"),
    out: Annotated[Path, typer.Option(help="Output .refuse file.")] = Path("artifacts/directions.refuse"),
    dtype: Annotated[str, typer.Option(help="Stored dtype: float32, bfloat16 or float16.")] = "float32",
) -> None:
    """Write the directions in llm-abliteration's .refuse layout (torch.save dict)."""
    from abliterate.formats.refuse import export_refuse

    layers = export_refuse(directions, out, dtype)
    reporter().message(f"export-refuse: {layers} layers ({dtype}) -> {out}")


if __name__ == "__main__":
    run_app(app)
