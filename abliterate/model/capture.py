"""Capture one prompt set's residual-stream activations into an activation parquet.

One forward pass per batch (no ``generate``), left padding, batches sorted by length; the hooks
of :mod:`abliterate.model.hooks` keep only the requested positions, and
:class:`abliterate.formats.activations.ActivationWriter` spills each batch to disk, so memory does
not grow with the prompt count beyond one index's vectors at the end.
"""

from __future__ import annotations

import time
from pathlib import Path

from abliterate.errors import fail
from abliterate.progress import PLAIN, Reporter


def capture(model_dir: Path, prompts: str, out: Path, batch_size: int = 32, dtype: str = "auto",
            device: str = "auto", positions: str = "-1", system_prompt: str = "", chat_template: str = "",
            streaming: str = "auto", shared_prefix: bool = True, max_prompt_tokens: int = 4096,
            report: Reporter = PLAIN) -> dict:
    """Capture one prompt set's activations at every residual index into ``out`` (parquet).

    ``streaming``: ``on`` reads one decoder layer at a time (:mod:`abliterate.model.streaming`),
    ``off`` loads the whole model, ``auto`` streams when the model does not fit the device.
    ``shared_prefix``: in memory, the tokens every prompt starts with (system block, role header) run
    once per pass (:mod:`abliterate.model.prefix`; kept only if the first batch agrees with the plain
    forward within 1e-4 relative); the streamed pass computes every token.
    ``max_prompt_tokens``: the longest rendered prompt accepted (the model's context also caps it),
    checked before any forward pass (:mod:`abliterate.model.prompt_limits`).
    Returns a summary dict (prompts, positions, layers, hidden size, seconds, streamed).
    """
    from abliterate.formats.activations import INDEX_CONVENTION, ActivationWriter
    from abliterate.hashing import sha256_file, sha256_text
    from abliterate.model import modelio
    from abliterate.model.hooks import capture_batches, parse_positions
    from abliterate.model.prompt_limits import render_checked, token_limit, warn_small
    from abliterate.model.prompts import load_prompts, prompts_hash, resolve_template, template_hash

    offsets = parse_positions(positions)
    if batch_size < 1:
        fail(f"capture batch size must be at least 1, got {batch_size}")
    modelio.check_model_dir(model_dir)
    from abliterate.model.streaming import load_spread, place, resolve_dtype

    device = modelio.pick_device(device)
    dtype = resolve_dtype(dtype, device, Path(model_dir))  # recorded resolved: same bytes
    where = place(streaming, Path(model_dir), dtype, device)
    streamed = where == "stream"
    texts = load_prompts(prompts)
    warn_small(texts, str(prompts), report)
    limit = token_limit(modelio.read_config(model_dir), max_prompt_tokens)
    tokenizer = modelio.load_tokenizer(model_dir)
    template = resolve_template(tokenizer, chat_template)
    sequences = render_checked(tokenizer, texts, str(prompts), limit, system_prompt, chat_template)
    shortest = min(len(s) for s in sequences)
    if shortest < -offsets[0]:
        fail(f"capture position {offsets[0]} is before the start of a {shortest}-token prompt; use positions closer to -1")

    import torch

    torch.manual_seed(0)
    started = time.perf_counter()
    config = modelio.read_config(model_dir)
    name = Path(str(prompts)).stem
    with ActivationWriter(out) as writer:
        if streamed:
            num_layers = _capture_streamed(model_dir, dtype, device, sequences, offsets, batch_size,
                                           tokenizer.pad_token_id, writer.add, name, Path(out).parent, report)
        else:
            model = (load_spread(Path(model_dir), dtype) if where == "spread"
                     else modelio.load_model(model_dir, dtype=dtype, device=device))
            with report.task(f"capture {name}", total=len(sequences)) as task:
                num_layers = capture_batches(model, sequences, offsets, batch_size, tokenizer.pad_token_id, writer.add,
                                             on_progress=task.advance, shared_prefix=shared_prefix,
                                             on_message=report.message)
        text_config = modelio.text_config(config)
        metadata = {
            "index_convention": INDEX_CONVENTION,
            "model": str((config.get("architectures") or [text_config.get("model_type", "unknown")])[0]),
            "model_type": str(text_config.get("model_type", "")),
            "model_config_sha256": sha256_file(Path(model_dir) / "config.json"),
            "hidden_size": str(writer.hidden),
            "num_layers": str(num_layers),
            "num_indices": str(num_layers + 1),
            "num_prompts": str(len(texts)),
            "positions": ",".join(str(o) for o in offsets),
            "dtype": dtype,
            "template_sha256": template_hash(template),
            "system_prompt_sha256": sha256_text(system_prompt),
            "prompt_file_sha256": sha256_file(prompts) if Path(str(prompts)).is_file() else "",
            "prompts_sha256": prompts_hash(texts),
        }
        writer.finish(len(texts), offsets, metadata)
    seconds = time.perf_counter() - started
    report.message(
        f"capture: {len(texts)} prompts x {len(offsets)} position(s) x {num_layers + 1} residual indices "
        f"(hidden {writer.hidden}){', streamed layer by layer,' if streamed else ''} -> {out} in {seconds:.1f} s"
    )
    return {"prompts": len(texts), "positions": offsets, "num_layers": num_layers, "hidden_size": writer.hidden,
            "seconds": seconds, "streamed": streamed}


def _capture_streamed(model_dir: Path, dtype: str, device: str, sequences: list[list[int]], offsets: list[int],
                      batch_size: int, pad_id: int, on_batch, name: str, scratch_in: Path, report: Reporter) -> int:
    """The capture of :func:`capture` with one decoder layer in memory at a time; returns ``L``."""
    import numpy as np
    import torch

    from abliterate.model.modelio import length_batches, pad_left, read_config
    from abliterate.model.streaming import DTYPE_BYTES, layer_batch, load_streamed, record_layer_calls, run_layers

    model = load_streamed(Path(model_dir), dtype=dtype, device=device, scratch_in=scratch_in)
    try:
        batch_size = layer_batch(read_config(model_dir), max(len(s) for s in sequences), DTYPE_BYTES[dtype],
                                 max(model.layer_bytes), batch_size)
        groups = length_batches([len(s) for s in sequences], batch_size)
        inputs, cols = [], []
        for group in groups:
            ids, mask, positions = pad_left([sequences[i] for i in group], pad_id, device=device)
            inputs.append({"input_ids": ids, "attention_mask": mask, "position_ids": positions})
            cols.append(torch.tensor([ids.shape[1] + o for o in offsets], dtype=torch.long, device=ids.device))
        hidden, calls = record_layer_calls(model, inputs)
        num_layers = len(model.layers)
        size = hidden[0].shape[-1]
        acts = [np.zeros((num_layers + 1, len(g), len(offsets), size), dtype=np.float32) for g in groups]
        with report.task(f"capture {name} (streamed)", total=float(sum(model.layer_bytes)), unit="bytes") as task:
            def take(i: int, states: list) -> None:
                for b, state in enumerate(states):
                    acts[b][i] = state.index_select(1, cols[b]).to(torch.float32).cpu().numpy()  # [B, P, H]
                if i > 0:
                    task.update(layer=f"layer {i}/{num_layers}")
                    task.advance(model.layer_bytes[i - 1])

            run_layers(model, hidden, calls, on_layer=take)
        for group, batch_acts in zip(groups, acts):
            on_batch(group, batch_acts)
        return num_layers
    finally:
        model.close()
