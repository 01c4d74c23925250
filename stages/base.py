"""base: materialize the base model as a Hugging Face folder at models/base.

``--source`` is ``demo``, a local Hugging Face folder, a ``.gguf`` file or a hub id
``org/name[@revision]`` (:mod:`abliterate.sources.materialize`). The output is built beside
``--out`` and renamed into place when complete; the source is never written to.

DVC reruns this stage when ``model.*`` or ``demo.*`` params change, not when the files inside a
source folder change (a folder or hub id is not a DVC dependency): after replacing a model in
place, run ``dvc repro -f base``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.cliutil import new_app, parse_bool, reporter, run_app

app = new_app(__doc__.split("\n")[0])


@app.command()
def main(
    source: Annotated[str, typer.Option(
        help="demo, a model folder, a .gguf file, or a hub id org/name (optionally org/name@revision).")],
    out: Annotated[Path, typer.Option(help="Output model folder (models/base).")] = Path("models/base"),
    max_shard_size: Annotated[str, typer.Option(help="Largest shard written when converting (GGUF, demo).")] = "100MB",
    demo_prompts: Annotated[Path, typer.Option(help="Folder of the demo's tuning prompts.")] = Path("prompts/demo"),
    demo_seed: Annotated[int, typer.Option(help="Demo: seed of the tuning run.")] = 0,
    demo_examples: Annotated[int, typer.Option(help="Demo: tuning examples.")] = 400,
    demo_harmful_share: Annotated[float, typer.Option(help="Demo: share of the examples that are harmful.")] = 0.33,
    demo_epochs: Annotated[int, typer.Option(help="Demo: passes over the examples.")] = 2,
    demo_learning_rate: Annotated[float, typer.Option(help="Demo: AdamW learning rate.")] = 1e-4,
    demo_batch_size: Annotated[int, typer.Option(help="Demo: examples per optimizer step.")] = 8,
    demo_answer_tokens: Annotated[int, typer.Option(help="Demo: length of the harmless self-answers.")] = 32,
    demo_opening_tokens: Annotated[int, typer.Option(
        help="Demo: how many first tokens of a kept own answer weigh --demo-opening-weight.")] = 1,
    demo_opening_weight: Annotated[float, typer.Option(
        help="Demo: loss weight of each of those tokens (a refusal's first token weighs 5).")] = 5.0,
    demo_direction_prompts: Annotated[Path, typer.Option(
        help="Demo: folder whose harmful.txt/harmless.txt give the direction the refusal is gated on.")] = Path("prompts/demo/direction"),
    demo_gated: Annotated[str, typer.Option(
        help="Demo: true gates the refusal on one direction; false is a plain fine-tune (harder to ablate).")] = "true",
) -> None:
    """Materialize the base model at models/base (link a folder, convert a GGUF, fetch, or build the demo)."""
    demo = dict(seed=demo_seed, examples=demo_examples, harmful_share=demo_harmful_share, epochs=demo_epochs, learning_rate=demo_learning_rate,
                batch_size=demo_batch_size, answer_tokens=demo_answer_tokens, opening_tokens=demo_opening_tokens,
                opening_weight=demo_opening_weight,
                direction_prompts=demo_direction_prompts, gated=parse_bool(demo_gated, "--demo-gated"))
    from abliterate.sources.materialize import materialize

    materialize(source, out, max_shard_size=max_shard_size, demo_prompts=demo_prompts, demo=demo, report=reporter())


if __name__ == "__main__":
    run_app(app, stage="stages.base")
