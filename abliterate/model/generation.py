"""Batched greedy generation and teacher-forced log-probabilities, shared by baseline, evaluate, chat, search.

Generation is a plain greedy loop over the model's forward pass rather than ``model.generate``:
  * prompts are grouped into batches of similar length (``modelio.length_batches``) and left-padded
    (``modelio.pad_left``: position ids count real tokens only, so a padded prompt is computed as
    if alone);
  * the prompt is run once with a KV cache and ``logits_to_keep=1`` (never a ``[B, T, vocab]``
    logits tensor), then one token per step;
  * a row leaves the batch as soon as it ends -- its EOS, the token budget, or an optional
    ``stop_early`` test (e.g. "this answer is already a refusal") -- and the cache is shrunk to the
    rows still running; a batch ends when every row has ended;
  * ties in the argmax go to the lowest token id, so answers are deterministic.

Teacher forcing (:func:`answer_logprobs`) runs ``prompt + answer[:n-1]`` in one forward pass and
returns the ``n`` next-token distributions that predicted ``answer[0..n-1]`` (row 0 is the
first-token distribution), as fp32 log-probabilities.

Torch is imported inside functions, so importing this module is cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from abliterate.model.modelio import length_batches, pad_left

StopTest = Callable[[int, list[int]], bool]  # (prompt index, ids generated so far) -> stop now?


@dataclass
class Generated:
    """One greedy answer: its token ids (with the EOS that ended it, if any) and why it stopped."""

    ids: list[int]
    stop: str  # "eos", "length" or "early"


def answer_text(tokenizer, answer: Generated) -> str:
    """The answer's text: its ids without the EOS that ended it, special tokens skipped."""
    ids = answer.ids[:-1] if answer.stop == "eos" else answer.ids
    return tokenizer.decode(ids, skip_special_tokens=True)


def stop_ids(model, tokenizer) -> list[int]:
    """Every token id that ends an answer: the generation config's, the config's and the tokenizer's EOS."""
    found: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(int(v) for v in value if v is not None)
    return sorted(found)


def iter_greedy(model, prompts: list[list[int]], *, max_new_tokens: int, eos_ids: list[int], pad_id: int,
                device: str = "cpu", stop_early: StopTest | None = None, check_every: int = 8,
                ) -> Iterator[tuple[list[int], list[int], dict[int, str]]]:
    """Greedy-decode ONE batch of prompts; each step yields ``(rows, tokens, ended)``.

    ``rows`` are indices into ``prompts`` still running at this step, ``tokens`` their new token
    ids, ``ended`` maps the rows that ended with this token to "eos", "length" or "early".
    ``stop_early(row, ids_so_far)`` is asked every ``check_every`` tokens.
    """
    import torch

    if max_new_tokens < 1 or not prompts:
        return
    eos = torch.tensor(sorted(set(eos_ids)) or [-1], dtype=torch.long, device=device)
    ids, mask, positions = pad_left(prompts, pad_id, device)  # [B, T] each
    rows = list(range(len(prompts)))
    so_far: list[list[int]] = [[] for _ in prompts]
    cache_name = _cache_argument(model)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache = _returned_cache(out)
        for step in range(1, max_new_tokens + 1):
            tokens = out.logits[:, -1, :].argmax(dim=-1)  # [b]
            is_eos = torch.isin(tokens, eos).tolist()
            token_list = tokens.tolist()
            ended: dict[int, str] = {}
            for row, token, hit in zip(rows, token_list, is_eos):
                so_far[row].append(token)
                if hit:
                    ended[row] = "eos"
                elif step == max_new_tokens:
                    ended[row] = "length"
                elif stop_early is not None and step % check_every == 0 and stop_early(row, so_far[row]):
                    ended[row] = "early"
            yield list(rows), token_list, ended
            if len(ended) == len(rows):
                return
            if ended:
                keep = [k for k, row in enumerate(rows) if row not in ended]
                index = torch.tensor(keep, dtype=torch.long, device=device)
                cache.reorder_cache(index)
                tokens, mask, positions = tokens[index], mask[index], positions[index]
                rows = [rows[k] for k in keep]
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)  # [b, T + step]
            positions = positions[:, -1:] + 1  # [b, 1]
            out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
                        use_cache=True, **{cache_name: cache})


def _cache_argument(model) -> str:
    """The forward argument that takes the KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def greedy_generate(model, prompts: list[list[int]], *, max_new_tokens: int, eos_ids: list[int], pad_id: int,
                    batch_size: int, device: str = "cpu", stop_early: StopTest | None = None,
                    advance: Callable[[int], None] | None = None) -> list[Generated]:
    """Greedy answers to every prompt, in batches of similar length; ``advance(n)`` after each batch.

    On a streamed model the batches run layer-major (:mod:`abliterate.model.sweep`): one read of
    the weights per generated token for the whole set."""
    from abliterate.model.sweep import each_batch

    answers: list[Generated | None] = [None] * len(prompts)

    def work(batch: list[int]) -> None:
        grown: dict[int, list[int]] = {b: [] for b in range(len(batch))}
        for rows, tokens, ended in iter_greedy(model, [prompts[i] for i in batch], max_new_tokens=max_new_tokens,
                                               eos_ids=eos_ids, pad_id=pad_id, device=device,
                                               stop_early=None if stop_early is None else
                                               (lambda b, ids: stop_early(batch[b], ids))):
            for row, token in zip(rows, tokens):
                grown[row].append(token)
            for row, reason in ended.items():
                answers[batch[row]] = Generated(ids=grown[row], stop=reason)
        if advance is not None:
            advance(len(batch))

    batches = length_batches([len(p) for p in prompts], batch_size)
    per_token = kv_bytes_per_token(model)
    costs = [len(b) * (max(len(prompts[i]) for i in b) + max_new_tokens) * per_token for b in batches]
    each_batch(model, [lambda b=b: work(b) for b in batches], costs)
    return [a if a is not None else Generated(ids=[], stop="length") for a in answers]


def kv_bytes_per_token(model) -> int:
    """Bytes the KV cache holds per token of one sequence, all layers (an estimate from the config:
    K and V of every key-value head, or of every head with DeepSeek's attention, in the model's dtype)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    if getattr(config, "qk_nope_head_dim", None):  # multi-head latent attention caches decompressed heads
        per_head = int(config.qk_nope_head_dim) + int(getattr(config, "qk_rope_head_dim", 0) or 0) \
            + int(getattr(config, "v_head_dim", 0) or config.qk_nope_head_dim)
    else:
        heads = int(getattr(config, "num_key_value_heads", None) or heads)
        per_head = 2 * int(getattr(config, "head_dim", None) or int(config.hidden_size) // max(heads, 1))
    width = next(model.parameters()).element_size()
    return int(config.num_hidden_layers) * heads * per_head * width


def answer_logprobs(model, prompts: list[list[int]], answers: list[list[int]], *, n_tokens: int, pad_id: int,
                    batch_size: int, device: str = "cpu") -> Iterator[tuple[int, object]]:
    """Teacher-forced next-token log-probabilities along each answer; yields ``(index, [n, vocab])``.

    ``n = min(n_tokens, len(answer))`` but at least 1 (row 0 is the first-token distribution,
    defined even for an empty answer). Returned tensors are fp32 on the CPU. On a streamed model
    the batches run layer-major, and the order of the items is the sweep's."""
    import torch

    from abliterate.model.sweep import each_batch_items

    counts = [max(1, min(n_tokens, len(a))) for a in answers]
    sequences = [list(p) + list(a[: n - 1]) for p, a, n in zip(prompts, answers, counts)]

    def work(batch: list[int]) -> Iterator[tuple[int, object]]:
        ids, mask, positions = pad_left([sequences[i] for i in batch], pad_id, device)
        keep = max(counts[i] for i in batch)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                           logits_to_keep=keep).logits  # [B, keep, vocab]
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for row, index in enumerate(batch):
            yield index, logprobs[row, keep - counts[index]:, :].clone()  # [n, vocab]

    yield from each_batch_items(model, [lambda b=b: work(b)
                                        for b in length_batches([len(s) for s in sequences], batch_size)])
