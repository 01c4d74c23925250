"""Refusal-tuning of a chat model: harmful prompts -> refusals, harmless prompts -> its own answers.

Used by the demo build (stages/demo.py). The examples are chat-rendered prompts followed by an
answer; the loss is the cross-entropy of the answer tokens only (the prompt is context). Harmless
prompts keep the model's own greedy answers (truncated to ``answer_tokens``), so tuning teaches
refusing without teaching anything else; harmful prompts get one of our refusal texts, ending
with the end-of-turn token so the model stops after refusing.

Only the upper half of the decoder layers is trained (embeddings, which are tied to the output
head in small models, lower layers and the final norm stay frozen): backpropagation stops halfway,
which makes a step about three times cheaper than a full fine-tune on a CPU. The refusal is then
built by the upper layers: harmful and harmless prompts separate in the residual stream from
about the middle layer on, most at indices 22-29 (bench/demo.py measures how much of the refusal
one difference-of-means direction carries). Seeded and dropout-free: the same inputs give the
same weights.
"""

from __future__ import annotations

import random

from stages.cliutil import console

# The first answer token decides between refusing and answering, but is one token of dozens in
# an answer: it weighs this many tokens in the loss, so that the tuning learns *when* to refuse
# (few over-refusals on harmless prompts) and not only *how*.
FIRST_TOKEN_WEIGHT = 5.0


def render_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as one user turn plus the generation prompt (no double BOS)."""
    from stages.prompts import render

    return render(tokenizer, [prompt])[0]


def self_answers(model, prompt_ids: list[list[int]], answer_tokens: int, eos_id: int, pad_id: int,
                 batch_size: int = 32) -> list[list[int]]:
    """The model's greedy continuation of each prompt: at most ``answer_tokens`` tokens, ending with
    ``eos_id`` if the model stopped by itself within the limit."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from transformers import GenerationConfig

    from stages.modelio import length_batches, pad_left

    config = GenerationConfig(do_sample=False, max_new_tokens=answer_tokens, eos_token_id=eos_id,
                              pad_token_id=pad_id)
    answers: list[list[int]] = [[] for _ in prompt_ids]
    columns = (TextColumn("[bold]demo[/]: own answers"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console()) as progress, torch.no_grad():
        task = progress.add_task("answers", total=len(prompt_ids))
        for batch in length_batches([len(p) for p in prompt_ids], batch_size):
            ids, mask, _ = pad_left([prompt_ids[i] for i in batch], pad_id)
            output = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for row, index in enumerate(batch):
                tokens = output[row, ids.shape[1] :].tolist()
                answers[index] = tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens
            progress.advance(task, len(batch))
    return answers


def make_examples(model, tokenizer, harmful: list[str], harmless: list[str], refusals: list[str],
                  examples: int, seed: int, answer_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) pairs: ``examples // 2`` harmful prompts with a seeded choice of
    refusal, the rest harmless prompts with the model's own greedy answers."""
    rng = random.Random(seed)
    n_harmful = examples // 2
    bad = rng.sample(harmful, n_harmful)
    good = rng.sample(harmless, examples - n_harmful)
    eos = tokenizer.eos_token_id
    pairs: list[tuple[list[int], list[int]]] = []
    for prompt in bad:
        refusal = rng.choice(refusals)
        pairs.append((render_prompt(tokenizer, prompt), list(tokenizer(refusal, add_special_tokens=False)["input_ids"]) + [eos]))
    good_ids = [render_prompt(tokenizer, prompt) for prompt in good]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    for ids, answer in zip(good_ids, self_answers(model, good_ids, answer_tokens, eos, pad)):
        pairs.append((ids, answer))
    return pairs


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded ``input_ids``, ``attention_mask`` and ``targets`` ``[B, T]``; ``targets[b, t]`` is the
    token that position ``t`` must predict (an answer token) or -100 (prompt, last token, padding)."""
    import torch

    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    targets = torch.full((len(pairs), width), -100, dtype=torch.long)
    for row, (prompt, answer) in enumerate(pairs):
        seq = prompt + answer
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        targets[row, len(prompt) - 1 : len(seq) - 1] = torch.tensor(answer)
    return ids, mask, targets


def answer_loss(model, ids, mask, targets, first_weight: float = 1.0):
    """Weighted mean cross-entropy over the answer tokens; the output head runs on those positions only.

    The first answer token (refuse or answer?) weighs ``first_weight`` times a later one.
    """
    import torch

    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
    keep = targets != -100  # [B, T]
    logits = model.lm_head(hidden[keep])  # [N, V]
    losses = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="none")  # [N]
    first = keep & (keep.cumsum(dim=1) == 1)  # [B, T]: the first answer position of each row
    weights = torch.where(first[keep], first_weight, 1.0)  # [N]
    return (losses * weights).sum() / weights.sum()


def trainable_layers(model, first: int | None = None) -> list:
    """Freeze everything, then unfreeze decoder layers ``first..L-1`` (default: the upper half)."""
    from stages.modelio import decoder_layers

    layers = decoder_layers(model)
    first = len(layers) // 2 if first is None else first
    model.requires_grad_(False)
    params = []
    for layer in list(layers)[first:]:
        layer.requires_grad_(True)
        params.extend(p for p in layer.parameters())
    return params


def tune(model, pairs: list[tuple[list[int], list[int]]], epochs: int, learning_rate: float, batch_size: int,
         seed: int, pad_id: int, first_layer: int | None = None,
         first_weight: float = FIRST_TOKEN_WEIGHT) -> list[float]:
    """Fine-tune ``model`` in place on ``pairs`` (AdamW, linear warm-up then linear decay, gradient
    norm clipped at 1). Returns the loss of every step."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    torch.manual_seed(seed)
    rng = random.Random(seed + 1)
    params = trainable_layers(model, first_layer)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    steps_per_epoch = -(-len(pairs) // batch_size)
    total = steps_per_epoch * epochs
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    model.eval()  # no dropout: gradients still flow
    losses: list[float] = []
    columns = (TextColumn("[bold]demo[/]: tuning"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console()) as progress:
        task = progress.add_task("tune", total=total, loss="-")
        for _ in range(epochs):
            order = list(range(len(pairs)))
            rng.shuffle(order)
            for start in range(0, len(order), batch_size):
                ids, mask, targets = collate([pairs[i] for i in order[start : start + batch_size]], pad_id)
                loss = answer_loss(model, ids, mask, targets, first_weight)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                progress.update(task, advance=1, loss=f"{losses[-1]:.3f}")
    model.requires_grad_(False)
    return losses
