"""Forward hooks that take the residual stream out of a model, one position at a time.

Forward pre-hooks on every decoder layer take the residual stream *entering* the layer, and a
forward hook on the last layer takes its output; each hook keeps only the requested prompt
positions, so the full ``[B, T, H]`` hidden states are never collected. The pass stops right
after the last layer (neither the final norm nor the LM head runs).

Index convention: residual index ``i`` is the stream entering decoder layer ``i``; ``0`` is the
embedding output (after any embedding scaling the model applies), ``L`` is the output of the last
layer *before* the final norm, so there are ``L + 1`` indices.
"""

from __future__ import annotations

from abliterate.errors import fail


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

    from abliterate.model.modelio import decoder_layers, length_batches, pad_left

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
