"""capture: residual-stream activations of one prompt set, written as parquet.

One forward pass per batch with hooks that keep only the requested prompt positions
(:mod:`abliterate.model.capture`); the file layout and the residual index convention are
:mod:`abliterate.formats.activations`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.cliutil import new_app, parse_bool, reporter, run_app

app = new_app(__doc__.split("\n")[0])


@app.command()
def main(
    model: Annotated[Path, typer.Option(help="Hugging Face model folder (models/base).")],
    prompts: Annotated[str, typer.Option(
        help="Prompt file (.txt/.jsonl/.json/.parquet/.csv) or hf:NAME, hf:NAME:split, hf:NAME:split:column.")],
    out: Annotated[Path, typer.Option(help="Output parquet file.")],
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass.")] = 32,
    dtype: Annotated[str, typer.Option(help="Compute dtype: auto (float32 on CPU, the checkpoint's on a GPU), checkpoint, float32, bfloat16, float16.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 or mps.")] = "auto",
    streaming: Annotated[str, typer.Option(
        help="on: one decoder layer in memory at a time; off: the whole model; auto: on when it does not fit.")] = "auto",
    positions: Annotated[str, typer.Option(
        help="Comma-separated negative offsets from the prompt end (-1 = last token).")] = "-1",
    system_prompt: Annotated[str, typer.Option(help="System prompt rendered before each prompt ('' = none).")] = "",
    chat_template: Annotated[str, typer.Option(help="Jinja template file for models without one ('' = the tokenizer's).")] = "",
    shared_prefix: Annotated[str, typer.Option(
        help="true: the prompts' shared template prefix runs once per pass (checked against the plain forward).")] = "true",
    max_prompt_tokens: Annotated[int, typer.Option(
        help="Longest rendered prompt accepted, in tokens (the model's context also caps it).")] = 4096,
) -> None:
    """Capture residual-stream activations of one prompt set (one forward pass per batch, hooks)."""
    from abliterate.model.capture import capture

    capture(model, prompts, out, batch_size=batch_size, dtype=dtype, device=device, streaming=streaming, positions=positions,
            system_prompt=system_prompt, chat_template=chat_template, max_prompt_tokens=max_prompt_tokens,
            shared_prefix=parse_bool(shared_prefix, "capture shared-prefix"), report=reporter())


if __name__ == "__main__":
    run_app(app, stage="stages.capture")
