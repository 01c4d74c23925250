"""capture: residual-stream activations of one prompt set, written as parquet.

One forward pass per batch (no ``generate``), left padding, batches sorted by length. Forward
pre-hooks on every decoder layer take the residual stream *entering* the layer, and a forward hook
on the last layer takes its output; each hook keeps only the requested prompt positions, so the
full ``[B, T, H]`` hidden states are never collected. The pass stops right after the last layer
(neither the final norm nor the LM head runs).

Index convention: residual index ``i`` is the stream entering decoder layer ``i``; ``0`` is the
embedding output (after any embedding scaling the model applies), ``L`` is the output of the last
layer *before* the final norm, so there are ``L + 1`` indices.

Parquet layout, one row per (prompt, position, index), sorted by index, then prompt, then position;
no row group mixes two indices: ``prompt: int32`` (0-based, in the order of the cleaned prompt
set), ``position: int16`` (negative offset from the end of the prompt, -1 = last token),
``layer: int16`` (the residual index), ``activation: fixed_size_list<float32>[hidden]``. The file
metadata holds the index convention, model, hidden size, layer count, dtype, positions and the
hashes of the chat template and of the prompt file.

While running, each index's rows are appended to a scratch file beside the output, so memory
holds one batch and, at the end, one index at a time: it does not grow with the prompt count
beyond one index's vectors.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from stages.cliutil import console, fail, new_app, run_app

INDEX_CONVENTION = (
    "residual index i = the residual stream entering decoder layer i; 0 = embedding output; "
    "L = output of the last decoder layer before the final norm; L + 1 indices"
)
ROW_GROUP_BYTES = 1 << 27  # at most ~128 MB of activations per row group

app = new_app(__doc__.split("\n")[0])


class _Done(Exception):
    """Raised by the last layer's hook: everything needed is captured, skip the rest."""


def parse_positions(text: str) -> list[int]:
    """``"-1,-3"`` -> ``[-3, -1]``: negative offsets from the end of the prompt, sorted, unique."""
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            fail(f"capture positions must be negative integers like -1 or -1,-2,-3, got {text!r}")
        if value >= 0:
            fail(f"capture position {value} is not an offset from the end; use -1 (last prompt token), -2, ...")
        out.add(value)
    return sorted(out)


def capture_batches(model, sequences: list[list[int]], offsets: list[int], batch_size: int, pad_id: int,
                    on_batch, on_progress=None) -> int:
    """Run ``model`` over token id lists; call ``on_batch(prompt_ids, acts)`` once per batch.

    ``acts`` is a float32 numpy array ``[L + 1, B, P, H]`` (residual index, prompt of the batch,
    position in ``offsets`` order, hidden). Returns ``L``, the number of decoder layers.
    """
    import torch

    from stages.modelio import decoder_layers, length_batches, pad_left

    layers = decoder_layers(model)
    num_layers = len(layers)
    device = next(model.parameters()).device
    state: dict = {}

    def take(hidden) -> None:
        # [B, T, H] -> [B, P, H]: only the requested positions leave the model
        state["acts"].append(hidden.index_select(1, state["cols"]).to(torch.float32).cpu())

    def pre_hook(_module, args, kwargs):
        take(args[0] if args else kwargs["hidden_states"])

    def last_hook(_module, _args, _kwargs, output):
        take(output[0] if isinstance(output, tuple) else output)
        raise _Done

    handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(last_hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            for batch in length_batches([len(s) for s in sequences], batch_size):
                ids, mask, positions = pad_left([sequences[i] for i in batch], pad_id, device=str(device))
                width = ids.shape[1]
                state["cols"] = torch.tensor([width + o for o in offsets], dtype=torch.long, device=device)
                state["acts"] = []
                try:
                    model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
                except _Done:
                    pass
                if len(state["acts"]) != num_layers + 1:
                    fail(f"{type(model).__name__} did not run all {num_layers} decoder layers; unsupported architecture")
                on_batch(batch, torch.stack(state["acts"]).numpy())  # [L+1, B, P, H]
                if on_progress is not None:
                    on_progress(len(batch))
    finally:
        for handle in handles:
            handle.remove()
    return num_layers


def write_parquet(out: Path, spill: list[Path], order: list[int], num_prompts: int, offsets: list[int],
                  hidden: int, metadata: dict[str, str]) -> None:
    """Assemble the per-index scratch files (rows in batch order) into the sorted parquet file."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.atomic import atomic_path

    npos = len(offsets)
    rows = num_prompts * npos
    # scratch row k holds prompt order[k // P] at position offsets[k % P]; its final row:
    target = np.repeat(np.asarray(order, dtype=np.int64) * npos, npos) + np.tile(np.arange(npos), len(order))
    schema = pa.schema(
        [
            ("prompt", pa.int32()),
            ("position", pa.int16()),
            ("layer", pa.int16()),
            ("activation", pa.list_(pa.float32(), hidden)),
        ]
    ).with_metadata({k.encode(): v.encode() for k, v in sorted(metadata.items())})
    prompt_col = pa.array(np.repeat(np.arange(num_prompts, dtype=np.int32), npos))
    position_col = pa.array(np.tile(np.asarray(offsets, dtype=np.int16), num_prompts))
    group_rows = max(1, ROW_GROUP_BYTES // (hidden * 4))
    with atomic_path(out) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="none", use_dictionary=False,
                              write_statistics=["prompt", "position", "layer"]) as writer:
            for index, path in enumerate(spill):
                scratch = np.fromfile(path, dtype=np.float32).reshape(rows, hidden)  # [N*P, H], batch order
                data = np.empty_like(scratch)
                data[target] = scratch  # [N*P, H], prompt order
                del scratch
                for start in range(0, rows, group_rows):
                    stop = min(rows, start + group_rows)
                    values = pa.array(data[start:stop].reshape(-1))
                    table = pa.Table.from_arrays(
                        [
                            prompt_col.slice(start, stop - start),
                            position_col.slice(start, stop - start),
                            pa.array(np.full(stop - start, index, dtype=np.int16)),
                            pa.FixedSizeListArray.from_arrays(values, hidden),
                        ],
                        schema=schema,
                    )
                    writer.write_table(table, row_group_size=stop - start)
                path.unlink()


def capture(model_dir: Path, prompts: str, out: Path, batch_size: int = 32, dtype: str = "float32",
            device: str = "auto", positions: str = "-1", system_prompt: str = "", chat_template: str = "") -> dict:
    """Capture one prompt set's activations at every residual index into ``out`` (parquet).

    Returns a summary dict (prompts, positions, layers, hidden size, seconds).
    """
    from stages import modelio
    from stages.prompts import file_hash, load_prompts, prompts_hash, render, resolve_template, template_hash

    offsets = parse_positions(positions)
    if batch_size < 1:
        fail(f"capture batch size must be at least 1, got {batch_size}")
    modelio.torch_dtype(dtype)  # validates the name before anything slow happens
    modelio.check_model_dir(model_dir)
    texts = load_prompts(prompts)
    tokenizer = modelio.load_tokenizer(model_dir)
    template = resolve_template(tokenizer, chat_template)
    sequences = render(tokenizer, texts, system_prompt=system_prompt, chat_template=chat_template)
    shortest = min(len(s) for s in sequences)
    if shortest < -offsets[0]:
        fail(f"capture position {offsets[0]} is before the start of a {shortest}-token prompt; use positions closer to -1")

    import torch

    torch.manual_seed(0)
    started = time.perf_counter()
    model = modelio.load_model(model_dir, dtype=dtype, device=device)
    config = modelio.read_config(model_dir)
    log = console()
    order: list[int] = []
    info: dict = {}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".scratch", dir=out.parent) as scratch_dir:
        handles: list = []

        def on_batch(batch: list[int], acts) -> None:  # acts: [L+1, B, P, H]
            if not handles:
                info["hidden"] = acts.shape[-1]
                handles.extend(open(Path(scratch_dir) / f"{i:05d}.f32", "wb") for i in range(acts.shape[0]))
            order.extend(batch)
            for index, handle in enumerate(handles):
                handle.write(acts[index].tobytes())

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("capture {task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        try:
            with Progress(*columns, console=log) as progress:
                task = progress.add_task(Path(str(prompts)).stem, total=len(sequences))
                num_layers = capture_batches(
                    model, sequences, offsets, batch_size, tokenizer.pad_token_id, on_batch,
                    on_progress=lambda n: progress.advance(task, n),
                )
        finally:
            for handle in handles:
                handle.close()
        spill = [Path(h.name) for h in handles]
        text_config = modelio.text_config(config)
        metadata = {
            "index_convention": INDEX_CONVENTION,
            "model": str((config.get("architectures") or [text_config.get("model_type", "unknown")])[0]),
            "model_type": str(text_config.get("model_type", "")),
            "model_config_sha256": hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest(),
            "hidden_size": str(info["hidden"]),
            "num_layers": str(num_layers),
            "num_indices": str(num_layers + 1),
            "num_prompts": str(len(texts)),
            "positions": ",".join(str(o) for o in offsets),
            "dtype": dtype,
            "template_sha256": template_hash(template),
            "system_prompt_sha256": hashlib.sha256(system_prompt.encode("utf-8")).hexdigest(),
            "prompt_file_sha256": file_hash(prompts) if Path(str(prompts)).is_file() else "",
            "prompts_sha256": prompts_hash(texts),
        }
        write_parquet(out, spill, order, len(texts), offsets, info["hidden"], metadata)
    seconds = time.perf_counter() - started
    log.print(
        f"capture: {len(texts)} prompts x {len(offsets)} position(s) x {num_layers + 1} residual indices "
        f"(hidden {info['hidden']}) -> {out} in {seconds:.1f} s"
    )
    return {"prompts": len(texts), "positions": offsets, "num_layers": num_layers, "hidden_size": info["hidden"],
            "seconds": seconds}


@app.command()
def main(
    model: Annotated[Path, typer.Option(help="Hugging Face model folder (models/base).")],
    prompts: Annotated[str, typer.Option(
        help="Prompt file (.txt/.jsonl/.json/.parquet/.csv) or hf:NAME, hf:NAME:split, hf:NAME:split:column.")],
    out: Annotated[Path, typer.Option(help="Output parquet file.")],
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass.")] = 32,
    dtype: Annotated[str, typer.Option(help="Compute dtype: float32, bfloat16, float16 or auto.")] = "float32",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 or mps.")] = "auto",
    positions: Annotated[str, typer.Option(
        help="Comma-separated negative offsets from the prompt end (-1 = last token).")] = "-1",
    system_prompt: Annotated[str, typer.Option(help="System prompt rendered before each prompt ('' = none).")] = "",
    chat_template: Annotated[str, typer.Option(help="Jinja template file for models without one ('' = the tokenizer's).")] = "",
) -> None:
    """Capture residual-stream activations of one prompt set (one forward pass per batch, hooks)."""
    capture(model, prompts, out, batch_size=batch_size, dtype=dtype, device=device, positions=positions,
            system_prompt=system_prompt, chat_template=chat_template)


if __name__ == "__main__":
    run_app(app)
