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
                    on_batch, on_progress=None, shared_prefix: bool = False, on_message=None) -> int:
    """Run ``model`` over token id lists; call ``on_batch(prompt_ids, acts)`` once per batch.

    ``acts`` is a float32 numpy array ``[L + 1, B, P, H]`` (residual index, prompt of the batch,
    position in ``offsets`` order, hidden). Returns ``L``, the number of decoder layers.

    ``shared_prefix``: the tokens every prompt starts with run once, and each batch continues from
    their KV cache (:mod:`abliterate.model.prefix`); the first batch is also run plainly and the
    prefix is kept only if both agree within :data:`abliterate.model.prefix.TOLERANCE`
    (``on_message`` hears which).
    """
    import torch

    from abliterate.model import prefix as shared
    from abliterate.model.modelio import decoder_layers, length_batches, pad_left

    layers = decoder_layers(model)
    num_layers = len(layers)
    device = next(model.parameters()).device
    state: dict = {"cols": None}

    def take(hidden) -> None:
        if state["cols"] is None:  # the shared prefix's own pass: nothing to keep
            return
        # [B, T, H] -> [B, P, H]: only the requested positions (per row) leave the model
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        state["acts"].append(hidden[rows, state["cols"]].to(torch.float32).cpu())

    def pre_hook(_module, args, kwargs):
        take(args[0] if args else kwargs["hidden_states"])

    def last_hook(_module, _args, _kwargs, output):
        if state["cols"] is not None:
            take(output[0] if isinstance(output, tuple) else output)
            raise _Done

    def run(kwargs: dict, cols) -> "torch.Tensor":
        state["cols"], state["acts"] = cols, []
        try:
            model(**kwargs)
        except _Done:
            pass
        if len(state["acts"]) != num_layers + 1:
            fail(f"{type(model).__name__} did not run all {num_layers} decoder layers; unsupported architecture")
        return torch.stack(state["acts"]).numpy()  # [L+1, B, P, H]

    def plain(batch: list[int]):
        ids, mask, positions = pad_left([sequences[i] for i in batch], pad_id, device=str(device))
        cols = torch.tensor([ids.shape[1] + o for o in offsets], dtype=torch.long, device=device)
        return run({"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": False},
                   cols.expand(len(batch), -1))

    def continued(batch: list[int]):
        suffixes = [sequences[i][length:] for i in batch]
        ends = torch.tensor([len(x) - 1 for x in suffixes], dtype=torch.long, device=device)  # right padded
        kwargs = shared.suffix_inputs(model, cache, suffixes, length, pad_id, device, pad="right")
        return run(kwargs, ends[:, None] + 1 + torch.tensor(offsets, dtype=torch.long, device=device)[None])

    handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(last_hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            length = shared.shared_length(sequences, -offsets[0]) if shared_prefix else 0
            if length and length * len(sequences) < shared.MIN_SHARE * sum(len(x) for x in sequences):
                if on_message is not None:
                    on_message(f"shared prefix not used: its {length} tokens are under {shared.MIN_SHARE:.0%} of all tokens")
                length = 0
            cache = shared.prefix_cache(model, sequences[0][:length], device) if length else None
            if length and cache is None:
                length = 0
                if on_message is not None:
                    on_message(f"shared prefix not used: {type(model).__name__}'s cache cannot be repeated over a batch")
            for number, batch in enumerate(length_batches([len(s) for s in sequences], batch_size)):
                acts = continued(batch) if length else plain(batch)
                if length and number == 0:
                    reference = plain(batch)
                    error = shared.agreement(reference, acts)
                    if error > shared.TOLERANCE:
                        length, cache, acts = 0, None, reference
                    if on_message is not None:
                        on_message(f"shared prefix: {length} tokens computed once (first batch within {error:.1e} "
                                   "of the plain forward)" if length else
                                   f"shared prefix not used: the first batch differs by {error:.1e} from the plain "
                                   f"forward (tolerance {shared.TOLERANCE:.0e}); every token is computed per batch")
                on_batch(batch, acts)
                if on_progress is not None:
                    on_progress(len(batch))
    finally:
        for handle in handles:
            handle.remove()
    return num_layers
