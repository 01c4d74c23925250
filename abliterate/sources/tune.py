"""Refusal-tuning of a chat model: harmful prompts -> refusals, harmless prompts -> its own answers.

Used by the demo build (abliterate/sources/demo.py). The examples are chat-rendered prompts followed by an
answer; the loss is the cross-entropy of the answer tokens only (the prompt is context). Harmless
prompts keep the model's own greedy answers (truncated to ``answer_tokens``), so tuning teaches
refusing without teaching anything else; harmful prompts get one of our refusal texts, ending
with the end-of-turn token so the model stops after refusing.

Only the decoder layers from ``first_layer`` up are trained (default: the upper half; the demo
starts two layers below its gate index). Embeddings, which are tied to the output head in small
models, lower layers and the final norm stay frozen, so backpropagation stops early, which makes a
step several times cheaper than a full fine-tune on a CPU.

**One refusal direction.** A plain fine-tune teaches the refusal, but spreads it over many
residual directions: removing the best difference-of-means direction left 95% of the demo's
refusals in place. A chat model trained at scale refuses through one direction (the premise of
abliteration), and the demo is there to show that case. So the tuning is *gated* on a direction
``u`` (the demo uses the untuned model's best-scored difference of means, :func:`gate_direction`).
Each step also runs a batch with ``u`` projected out of every tuned layer's residual writes
(attention and MLP outputs) and teaches the untuned model's own answers there, to harmful and
harmless prompts alike. The model learns to refuse when its upper layers can write ``u`` and to
answer as before when they cannot, which is what an ablation of ``u`` then finds. The pipeline is
not told ``u``: it measures its own direction from activations. Seeded and dropout-free: the same
inputs give the same weights.
"""

from __future__ import annotations

import contextlib
import random
from typing import NamedTuple

from abliterate.progress import PLAIN, Reporter

# The first answer token decides between refusing and answering, but is one token of dozens in
# an answer: it weighs this many tokens in the loss, so that the tuning learns *when* to refuse
# (few over-refusals on harmless prompts) and not only *how*. On the rows that keep the untuned
# model's own answers the decision can come later: "I'm glad you asked" parts from "I'm sorry, but"
# at its third token. So their first few tokens (the opening) may weigh more (``Opening``).
FIRST_TOKEN_WEIGHT = 5.0


class Opening(NamedTuple):
    """The first ``tokens`` answer tokens of a kept own answer weigh ``weight`` later tokens each."""

    tokens: int
    weight: float


# The modules whose outputs a Llama-style decoder layer adds to the residual stream (its writers).
WRITER_MODULES = ("self_attn.o_proj", "mlp.down_proj")


def render_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as one user turn plus the generation prompt (no double BOS)."""
    from abliterate.model.prompts import render

    return render(tokenizer, [prompt])[0]


def self_answers(model, prompt_ids: list[list[int]], answer_tokens: int, eos_id: int, pad_id: int,
                 batch_size: int = 32, report: Reporter = PLAIN) -> list[list[int]]:
    """The model's greedy continuation of each prompt: at most ``answer_tokens`` tokens, ending with
    ``eos_id`` if the model stopped by itself within the limit."""
    import torch
    from transformers import GenerationConfig

    from abliterate.model.modelio import length_batches, pad_left

    config = GenerationConfig(do_sample=False, max_new_tokens=answer_tokens, eos_token_id=eos_id,
                              pad_token_id=pad_id)
    answers: list[list[int]] = [[] for _ in prompt_ids]
    with report.task("demo: own answers", total=len(prompt_ids)) as task, torch.no_grad():
        for batch in length_batches([len(p) for p in prompt_ids], batch_size):
            ids, mask, _ = pad_left([prompt_ids[i] for i in batch], pad_id)
            output = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for row, index in enumerate(batch):
                tokens = output[row, ids.shape[1] :].tolist()
                answers[index] = tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens
            task.advance(len(batch))
    return answers


def harmful_count(examples: int, harmful_share: float) -> int:
    """How many of ``examples`` tuning pairs are harmful (at least one, and at least one harmless)."""
    return min(max(1, round(examples * harmful_share)), examples - 1)


def make_examples(model, tokenizer, harmful: list[str], harmless: list[str], refusals: list[str],
                  examples: int, seed: int, answer_tokens: int, harmful_share: float = 0.5,
                  report: Reporter = PLAIN) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) pairs: :func:`harmful_count` harmful prompts first, each with a seeded
    choice of refusal, then the rest: harmless prompts with the model's own greedy answers."""
    rng = random.Random(seed)
    n_harmful = harmful_count(examples, harmful_share)
    bad = rng.sample(harmful, n_harmful)
    good = rng.sample(harmless, examples - n_harmful)
    eos = tokenizer.eos_token_id
    pairs: list[tuple[list[int], list[int]]] = []
    for prompt in bad:
        refusal = rng.choice(refusals)
        pairs.append((render_prompt(tokenizer, prompt), list(tokenizer(refusal, add_special_tokens=False)["input_ids"]) + [eos]))
    good_ids = [render_prompt(tokenizer, prompt) for prompt in good]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    for ids, answer in zip(good_ids, self_answers(model, good_ids, answer_tokens, eos, pad, report=report)):
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


def gated_examples(model, tokenizer, pairs: list[tuple[list[int], list[int]]], answer_tokens: int,
                   n_harmful: int | None = None, report: Reporter = PLAIN) -> list[tuple[list[int], list[int]]]:
    """What the model must answer with its refusal direction removed: the untuned model's own
    answers to the harmful prompts of ``pairs`` (its first ``n_harmful``, default half, from
    :func:`make_examples`), and the harmless pairs unchanged (they already hold its own answers)."""
    n_harmful = len(pairs) // 2 if n_harmful is None else n_harmful
    prompts = [prompt for prompt, _ in pairs[:n_harmful]]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return list(zip(prompts, self_answers(model, prompts, answer_tokens, eos, pad, report=report))) + pairs[n_harmful:]


def gate_direction(model, harmful: list[list[int]], harmless: list[list[int]], pad_id: int,
                       min_depth: float = 0.1, max_depth: float = 0.9):
    """``(index, u)``: the best-scored residual index of the model on these prompts and its unit
    difference-of-means direction (fp64 ``[H]``), measured and ranked as the pipeline's capture,
    reduce and score stages do (last prompt token, fp64 means, ``abliterate.scoring.pick_best``)."""
    import numpy as np
    import torch

    from abliterate.model.hooks import capture_batches
    from abliterate.scoring import index_scores, pick_best

    sums: list = []
    for prompts in (harmful, harmless):
        total = {"sum": None}

        def add(_batch, acts, total=total):  # acts [L+1, B, 1, H]
            part = acts[:, :, 0, :].astype(np.float64).sum(axis=1)  # [L+1, H]
            total["sum"] = part if total["sum"] is None else total["sum"] + part

        num_layers = capture_batches(model, prompts, [-1], 32, pad_id, add)
        sums.append(torch.from_numpy(total["sum"] / len(prompts)))  # [L+1, H]
    directions = {}
    for i in range(num_layers + 1):
        directions[f"harmful_mean.{i}"], directions[f"harmless_mean.{i}"] = sums[0][i], sums[1][i]
        directions[f"direction.{i}"] = sums[0][i] - sums[1][i]
    index = pick_best(index_scores(directions), num_layers, min_depth, max_depth)
    diff = directions[f"direction.{index}"]
    return index, diff / diff.norm()


@contextlib.contextmanager
def without_direction(layers, u):
    """Project the unit vector ``u`` (``[H]``) out of every residual write (attention and MLP
    outputs) of ``layers`` while the block runs."""
    def project(_module, _args, output):
        v = u.to(output.dtype)
        return output - (output @ v).unsqueeze(-1) * v  # [B, T, H]

    handles = [layer.get_submodule(path).register_forward_hook(project) for layer in layers for path in WRITER_MODULES]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def answer_loss(model, ids, mask, targets, first_weight: float = 1.0, teacher=None, soft=None,
                opening: Opening | None = None):
    """Weighted mean loss over the answer tokens; the output head runs on those positions only.

    A row is learnt from its answer tokens (cross-entropy), or, where ``soft`` (``[B]`` bool) is
    set, from the ``teacher`` model's whole next-token distribution along that answer (KL(teacher
    || model)): the model keeps the teacher's distribution there, not just its top token. The first
    answer token (refuse or answer?) weighs ``first_weight`` times a later one; on a soft row the
    first ``opening.tokens`` weigh ``opening.weight`` times instead (default: as on the others).
    """
    import torch

    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
    keep = targets != -100  # [B, T]
    logits = model.lm_head(hidden[keep]).float()  # [N, V]
    losses = torch.nn.functional.cross_entropy(logits, targets[keep], reduction="none")  # [N]
    rows = torch.zeros_like(losses, dtype=torch.bool)  # [N]: positions of the soft rows
    if teacher is not None and soft is not None and bool(soft.any()):
        rows = soft[:, None].expand_as(keep)[keep]
        with torch.no_grad():
            taught = teacher.model(input_ids=ids, attention_mask=mask).last_hidden_state[keep][rows]
            target = torch.log_softmax(teacher.lm_head(taught).float(), dim=-1)  # [n, V]
        student = torch.log_softmax(logits[rows], dim=-1)
        losses = losses.masked_scatter(rows, (target.exp() * (target - student)).sum(dim=-1))
    position = keep.cumsum(dim=1)[keep]  # [N]: 1 for the first answer token of its row, 2, ...
    weights = torch.where(position == 1, first_weight, 1.0)  # [N]
    if opening is not None:
        weights = torch.where(rows & (position <= opening.tokens), opening.weight, weights)
    return (losses * weights).sum() / weights.sum()


def trainable_layers(model, first: int | None = None) -> tuple[list, list]:
    """Freeze everything, then unfreeze decoder layers ``first..L-1`` (default: the upper half).
    Returns ``(those layers, their parameters)``."""
    from abliterate.model.modelio import decoder_layers

    layers = decoder_layers(model)
    first = len(layers) // 2 if first is None else first
    model.requires_grad_(False)
    tuned, params = list(layers)[first:], []
    for layer in tuned:
        layer.requires_grad_(True)
        params.extend(p for p in layer.parameters())
    return tuned, params


def tune(model, pairs: list[tuple[list[int], list[int]]], epochs: int, learning_rate: float, batch_size: int,
         seed: int, pad_id: int, first_layer: int | None = None,
         first_weight: float = FIRST_TOKEN_WEIGHT, gate: tuple | None = None, soft: list[bool] | None = None,
         opening: Opening | None = None, report: Reporter = PLAIN) -> list[float]:
    """Fine-tune ``model`` in place on ``pairs`` (AdamW, linear warm-up then linear decay, gradient
    norm clipped at 1). Returns the loss of every step.

    ``soft``: per pair, whether its answer is the untuned model's own (then it is learnt as the
    untuned model's distribution along the answer, from a frozen copy: the tuning leaves those
    prompts as they were) or a new answer to learn (a refusal: cross-entropy). ``gate = (u,
    gated_pairs)``: each step also learns a batch of ``gated_pairs`` (the untuned model's own
    answers, soft when ``soft`` is given) with the unit direction ``u`` (``[H]``) projected out of
    the tuned layers' residual writes. ``opening``: the weight of the soft rows' first tokens
    (default: ``first_weight`` on the first one, as on the refusals)."""
    import copy

    import torch

    teacher = None
    if soft is not None:
        teacher = copy.deepcopy(model).eval().requires_grad_(False)  # the untuned model, frozen
        soft_rows = torch.tensor(soft, dtype=torch.bool)

    torch.manual_seed(seed)
    rng = random.Random(seed + 1)
    tuned, params = trainable_layers(model, first_layer)
    cycle = _shuffled_cycle(len(gate[1]) if gate else 1, rng)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    steps_per_epoch = -(-len(pairs) // batch_size)
    total = steps_per_epoch * epochs
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    model.eval()  # no dropout: gradients still flow
    losses: list[float] = []
    with report.task("demo: tuning", total=total, loss="loss -") as task:
        for _ in range(epochs):
            order = list(range(len(pairs)))
            rng.shuffle(order)
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                ids, mask, targets = collate([pairs[i] for i in batch], pad_id)
                loss = answer_loss(model, ids, mask, targets, first_weight, teacher,
                                   None if teacher is None else soft_rows[batch], opening)
                if gate is not None:
                    u, gated = gate
                    chosen = [gated[next(cycle)] for _ in range(min(batch_size, len(gated)))]
                    ids, mask, targets = collate(chosen, pad_id)
                    every = None if teacher is None else torch.ones(len(chosen), dtype=torch.bool)
                    with without_direction(tuned, u):
                        loss = loss + answer_loss(model, ids, mask, targets, first_weight, teacher, every, opening)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                task.update(loss=f"loss {losses[-1]:.3f}")
                task.advance(1)
    model.requires_grad_(False)
    return losses


def _shuffled_cycle(n: int, rng: random.Random):
    """Indices ``0..n-1`` forever, reshuffled on every pass."""
    while True:
        order = list(range(n))
        rng.shuffle(order)
        yield from order
