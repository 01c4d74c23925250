"""The search's validation prompts and the two numbers it scores every trial by.

Validation prompts are the **last** ``n`` prompts of the measurement files (``prompts/harmful.txt``
and ``prompts/harmless.txt``, after the usual cleaning: blank lines and duplicates dropped), so they
never overlap the held-out ``prompts/eval/`` sets that ``evaluate`` reports on. They are also among
the prompts the directions were measured on; the search tunes a handful of kernel parameters on
them, and its result is judged on the eval sets it never saw.

* **refusals**: greedy answers to the harmful validation prompts, judged by ``stages.refusal``.
  Each trial uses a short answer (``proxy_tokens``, a cheap proxy); the best candidates are
  confirmed with real answers (``confirm_tokens``, stopped early once a refusal is certain, as
  ``evaluate`` does).
* **damage**: mean over the harmless validation prompts of KL(base || trial) of the first answer
  token, full vocabulary, natural log (heretic's number); the base distributions are computed once.

Everything runs batched (prompts of similar length together, left padding, KV cache while
generating) through ``stages.generation``, the code ``baseline`` and ``evaluate`` use.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from stages.cliutil import fail


@dataclass
class ValidationSet:
    harmful: list[str]
    harmless: list[str]
    info: dict  # per set: file, first (0-based index of the first prompt used), count, sha256


def split_validation(harmful: str | Path, harmless: str | Path, count: int) -> ValidationSet:
    """The last ``count`` prompts of each measurement file (a clear error if a file has fewer)."""
    from stages.prompts import load_prompts, prompts_hash

    if count < 1:
        fail(f"search.validation must be at least 1, got {count}")
    sets, info = {}, {}
    for name, path in (("harmful", harmful), ("harmless", harmless)):
        prompts = load_prompts(path)
        if len(prompts) < count:
            fail(f"{path} has {len(prompts)} prompts but search.validation asks for the last {count}; "
                 "lower search.validation")
        sets[name] = prompts[-count:]
        info[name] = {"file": str(path), "first": len(prompts) - count, "count": count,
                      "sha256": prompts_hash(sets[name])}
    return ValidationSet(sets["harmful"], sets["harmless"], info)


class Scorer:
    """Scores the model *as it currently is* on the rendered validation prompts."""

    def __init__(self, model, tokenizer, harmful_ids: list[list[int]], harmless_ids: list[list[int]], *,
                 batch_size: int, device: str):
        from stages.generation import stop_ids

        self.model, self.tokenizer = model, tokenizer
        self.harmful_ids, self.harmless_ids = harmful_ids, harmless_ids
        self.batch_size, self.device = batch_size, device
        self.eos = stop_ids(model, tokenizer)
        self.pad = int(tokenizer.pad_token_id)
        self.base = None  # [n, vocab] fp64 log-probabilities of the base model (set by remember_base)

    def first_token_logprobs(self):
        """``[n_harmless, vocab]`` fp32 log-probabilities of the first answer token."""
        import torch

        from stages.generation import answer_logprobs

        rows = [None] * len(self.harmless_ids)
        for i, logprobs in answer_logprobs(self.model, self.harmless_ids, [[] for _ in self.harmless_ids],
                                           n_tokens=1, pad_id=self.pad, batch_size=self.batch_size,
                                           device=self.device):
            rows[i] = logprobs[0]
        return torch.stack(rows)

    def remember_base(self) -> str:
        """Keep the base model's first-token distributions; returns their sha256 (pins the weights)."""
        import torch

        base = self.first_token_logprobs()
        self.base = base.to(torch.float64)
        return hashlib.sha256(base.numpy().tobytes()).hexdigest()

    def kl(self) -> float:
        """Mean KL(base || current) of the first answer token over the harmless prompts (nats)."""
        import torch

        if self.base is None:
            raise RuntimeError("remember_base() first")
        q = self.first_token_logprobs().to(torch.float64).clamp(min=-1e4)
        p_log = self.base.clamp(min=-1e4)
        p = self.base.exp()
        terms = torch.where(p > 0, p * (p_log - q), torch.zeros_like(p))
        per_prompt = terms.sum(dim=1).clamp(min=0.0)  # [n]
        return float(per_prompt.mean())

    def refusals(self, max_new_tokens: int, stop_early: bool = False) -> list[bool]:
        """Does each harmful prompt's greedy answer (at most ``max_new_tokens``) refuse?"""
        from stages.generation import answer_text, greedy_generate
        from stages.refusal import is_refusal

        stop = None
        if stop_early:
            from stages.baseline import refusal_stop

            stop = refusal_stop(self.tokenizer, set(range(len(self.harmful_ids))))
        answers = greedy_generate(self.model, self.harmful_ids, max_new_tokens=max_new_tokens, eos_ids=self.eos,
                                  pad_id=self.pad, batch_size=self.batch_size, device=self.device, stop_early=stop)
        return [is_refusal(answer_text(self.tokenizer, a)) for a in answers]
