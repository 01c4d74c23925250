"""The search's validation prompts and the two numbers it scores every trial by.

Validation prompts are the **last** ``n`` prompts of the measurement files (``prompts/harmful.txt``
and ``prompts/harmless.txt``, after the usual cleaning: blank lines and duplicates dropped), so they
never overlap the held-out ``prompts/eval/`` sets that ``evaluate`` reports on. They are also among
the prompts the directions were measured on; the search tunes a handful of kernel parameters on
them, and its result is judged on the eval sets it never saw.

* **refusals**: greedy answers to the harmful validation prompts, judged by ``abliterate.refusal``.
  Each trial uses a short answer (``proxy_tokens``, a cheap proxy); the best candidates are
  confirmed with real answers (``confirm_tokens``, stopped early once a refusal is certain, as
  ``evaluate`` does) to the **confirmation prompts**: the last ``confirm`` harmful prompts, a
  superset of the validation ones. Picking the fewest of 100 noisy counts favours trials that
  happen to suit those 32 prompts; counting again on several times as many prompts, most of them
  unseen by the sampler, removes much of that luck from the choice.
* **over-refusal** (confirmed trials only): real answers to the last ``n`` prompts of
  ``prompts/borderline.txt`` (edgy but harmless requests, disjoint from ``prompts/eval/``), judged
  the same way; among confirmed trials with equally few refusals, the one refusing fewer of these wins.
* **damage**: mean over the harmless validation prompts of KL(base || trial) of the first answer
  token, full vocabulary, natural log (heretic's number); the base distributions are computed once.

Everything runs batched (prompts of similar length together, KV cache while generating). The
rendered prompts share a long opening (the chat template's system block, e.g. 30 of SmolLM2's ~47
tokens), so each trial runs that **shared prefix once** and the prompts' own tokens on top of its
KV cache (padding sits between prefix and prompt, masked; positions count real tokens only): about
half the work of a trial. The scorer checks once, on the base model, that this gives the same
first-token distributions as whole prompts (mean KL below 1e-6) and otherwise runs whole prompts
through ``abliterate.model.generation``, the code ``baseline`` and ``evaluate`` use. The confirmation answers
always take that path (``greedy_generate``, early refusal stop).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from abliterate.errors import fail

def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


@dataclass
class ValidationSet:
    harmful: list[str]
    harmless: list[str]
    confirm: list[str]  # harmful prompts that confirm the best trials (the last ones of the file)
    info: dict  # per set: file, first (0-based index of the first prompt used), count, sha256
    borderline: list[str] = field(default_factory=list)  # edgy but harmless (over-refusal; may be none)


def split_validation(harmful: str | Path, harmless: str | Path, count: int, confirm: int = 0,
                     borderline: str | Path | None = None) -> ValidationSet:
    """The last ``count`` prompts of each measurement file (and of ``borderline``, when given) and the
    last ``confirm`` harmful ones (0: the validation ones); a clear error if a file has fewer."""
    from abliterate.model.prompts import load_prompts, prompts_hash

    if count < 1:
        fail(f"search.validation must be at least 1, got {count}")
    sets, info = {"borderline": []}, {}
    files = [("harmful", harmful), ("harmless", harmless)]
    if borderline:
        files.append(("borderline", borderline))
    for name, path in files:
        prompts = load_prompts(path)
        if len(prompts) < count:
            fail(f"{path} has {len(prompts)} prompts but search.validation asks for the last {count}; "
                 "lower search.validation")
        sets[name] = prompts[-count:]
        info[name] = {"file": str(path), "first": len(prompts) - count, "count": count,
                      "sha256": prompts_hash(sets[name])}
        if name == "harmful":
            confirm = confirm or count
            if len(prompts) < confirm:
                fail(f"{path} has {len(prompts)} prompts but search.confirm-prompts asks for the last {confirm}; "
                     "lower search.confirm-prompts")
            sets["confirm"] = prompts[-confirm:]
            info["confirm"] = {"file": str(path), "first": len(prompts) - confirm, "count": confirm,
                               "sha256": prompts_hash(sets["confirm"])}
    return ValidationSet(sets["harmful"], sets["harmless"], sets["confirm"], info, sets["borderline"])


class Scorer:
    """Scores the model *as it currently is* on the rendered validation prompts."""

    def __init__(self, model, tokenizer, harmful_ids: list[list[int]], harmless_ids: list[list[int]], *,
                 batch_size: int, device: str, confirm_ids: list[list[int]] | None = None,
                 borderline_ids: list[list[int]] | None = None):
        from abliterate.model.generation import stop_ids

        self.model, self.tokenizer = model, tokenizer
        self.harmful_ids, self.harmless_ids = harmful_ids, harmless_ids
        self.confirm_ids = harmful_ids if confirm_ids is None else confirm_ids
        self.borderline_ids = borderline_ids or []  # edgy but harmless prompts: over-refusal of confirmed trials
        self.batch_size, self.device = batch_size, device
        self.eos = stop_ids(model, tokenizer)
        self.pad = int(tokenizer.pad_token_id)
        self.base = None  # [n, vocab] fp64 log-probabilities of the base model (set by remember_base)
        from abliterate.model.prefix import shared_length

        everything = harmful_ids + harmless_ids
        self.prefix = everything[0][:shared_length(everything)]  # shared by every prompt; at least one own token each
        self.share = len(self.prefix) > 0
        self.replay = None  # abliterate.model.replay.Replay of the base model's bottom layers (remember_base)
        self.unchanged = 0  # bottom layers the current trial leaves as in the base model (set by the caller)
        self._recording = False

    # --- the shared prefix ------------------------------------------------------------------------

    def _prefix_cache(self):
        """KV cache of the shared prefix (one row), computed with the model as it is now."""
        from abliterate.model.prefix import prefix_cache

        return prefix_cache(self.model, self.prefix, self.device)

    def _suffix_forward(self, prefix_cache, prompts: list[list[int]], key=None):
        """Run the prompts' own tokens on the prefix cache: (last logits [b, vocab], mask, next positions, cache).

        ``key`` names the batch for the replay of unchanged bottom layers (``abliterate.model.replay``)."""
        import torch

        from abliterate.model.generation import _returned_cache
        from abliterate.model.prefix import suffix_inputs

        p = len(self.prefix)
        kwargs = suffix_inputs(self.model, prefix_cache, [ids[p:] for ids in prompts], p, self.pad, self.device,
                               pad="left")

        def run():
            with torch.inference_mode():
                out = self.model(**kwargs, logits_to_keep=1)
            return out.logits[:, -1, :], kwargs["attention_mask"], kwargs["position_ids"][:, -1:] + 1, _returned_cache(out)

        if self.replay is None or key is None:
            return run()
        if self._recording:
            return self.replay.capture(key, p, run)
        with self.replay.active(key, self.unchanged):
            return run()

    def _shared_logprobs(self):
        import torch

        from abliterate.model.modelio import length_batches

        prefix_cache = self._prefix_cache()
        rows = [None] * len(self.harmless_ids)
        for batch in length_batches([len(x) for x in self.harmless_ids], self.batch_size):
            logits, _, _, _ = self._suffix_forward(prefix_cache, [self.harmless_ids[i] for i in batch],
                                                   key=("harmless", tuple(batch)))
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            for k, i in enumerate(batch):
                rows[i] = logprobs[k]
        return torch.stack(rows)

    def _shared_greedy(self, steps: int) -> list[list[int]]:
        """``steps`` greedy tokens for every harmful prompt on the prefix cache (rows are not retired)."""
        import torch

        from abliterate.model.generation import _cache_argument, _returned_cache
        from abliterate.model.modelio import length_batches

        prefix_cache = self._prefix_cache()
        answers: list[list[int]] = [[] for _ in self.harmful_ids]
        argument = _cache_argument(self.model)
        for batch in length_batches([len(x) for x in self.harmful_ids], self.batch_size):
            logits, mask, positions, cache = self._suffix_forward(prefix_cache, [self.harmful_ids[i] for i in batch],
                                                                  key=("harmful", tuple(batch)))
            grown = [[] for _ in batch]
            with torch.inference_mode():
                for step in range(steps):
                    tokens = logits.argmax(dim=-1)  # [b]
                    for row, token in enumerate(tokens.tolist()):
                        grown[row].append(token)
                    if step == steps - 1:
                        break
                    mask = torch.cat([mask, mask.new_ones((len(batch), 1))], dim=1)
                    out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
                                     use_cache=True, **{argument: cache})
                    logits, cache, positions = out.logits[:, -1, :], _returned_cache(out), positions + 1
            for k, i in enumerate(batch):
                answers[i] = grown[k]
        return answers

    def first_token_logprobs(self):
        """``[n_harmless, vocab]`` fp32 log-probabilities of the first answer token."""
        if self.share:
            return self._shared_logprobs()
        return self._whole_logprobs()

    def _whole_logprobs(self):
        import torch

        from abliterate.model.generation import answer_logprobs

        rows = [None] * len(self.harmless_ids)
        for i, logprobs in answer_logprobs(self.model, self.harmless_ids, [[] for _ in self.harmless_ids],
                                           n_tokens=1, pad_id=self.pad, batch_size=self.batch_size,
                                           device=self.device):
            rows[i] = logprobs[0]
        return torch.stack(rows)

    def remember_base(self) -> str:
        """Keep the base model's first-token distributions; returns their sha256 (pins the weights)."""
        import torch

        whole = self._whole_logprobs()
        if self.share:
            try:
                shared = self._shared_logprobs()
                p = whole.double().exp()
                gap = float((p * (whole.double() - shared.double())).sum(dim=1).mean())
                self.share = abs(gap) < 1e-6
            except Exception:  # a cache layout the prefix path does not handle: whole prompts then
                self.share = False
        base = self.first_token_logprobs()
        self.base = base.to(torch.float64)
        if self.share:
            self._record_bottom()
        return hashlib.sha256(base.numpy().tobytes()).hexdigest()

    def _record_bottom(self) -> None:
        """Record the base model's bottom layers on every validation batch; keep them if replaying is exact."""
        from abliterate.model.modelio import length_batches
        from abliterate.model.replay import Replay

        batches = sum(len(length_batches([len(x) for x in ids], self.batch_size))
                      for ids in (self.harmful_ids, self.harmless_ids))
        self.replay = Replay(self.model, batches)
        self._recording = True
        try:
            computed = self._shared_logprobs(), self._shared_greedy(2)
        finally:
            self._recording = False
        self.unchanged = self.replay.depth or 0
        try:
            replayed = self._shared_logprobs(), self._shared_greedy(2)
            exact = bool(torch_equal(computed[0], replayed[0])) and computed[1] == replayed[1]
        except Exception:  # an architecture whose layers cannot be stood in for: compute them
            exact = False
        finally:
            self.unchanged = 0
        if not (exact and self.replay.enabled and self.replay.depth):
            self.replay = None

    def kl(self) -> float:
        """Mean KL(base || current) of the first answer token over the harmless prompts (nats)."""
        if self.base is None:
            raise RuntimeError("remember_base() first")
        from abliterate.kl import kl_rows

        return float(kl_rows(self.base, self.first_token_logprobs()).mean())

    def refusals(self, max_new_tokens: int, stop_early: bool = False, confirm: bool = False) -> list[bool]:
        """Does each harmful prompt's greedy answer (at most ``max_new_tokens``) refuse?

        ``confirm``: answer the confirmation prompts instead (whole prompts, the path ``evaluate`` uses)."""
        from abliterate.refusal import is_refusal

        if self.share and not stop_early and not confirm:  # the shared-prefix path answers harmful_ids
            eos = set(self.eos)
            texts = []
            for answer in self._shared_greedy(max_new_tokens):
                end = next((k for k, t in enumerate(answer) if t in eos), len(answer))
                texts.append(self.tokenizer.decode(answer[:end], skip_special_tokens=True))
            return [is_refusal(t) for t in texts]
        return self._judged(self.confirm_ids if confirm else self.harmful_ids, max_new_tokens, stop_early)

    def over_refusals(self, max_new_tokens: int) -> list[bool]:
        """Does each borderline prompt's greedy answer refuse? (whole prompts, stopped early, as ``evaluate``)"""
        return self._judged(self.borderline_ids, max_new_tokens, stop_early=True)

    def _judged(self, ids: list[list[int]], max_new_tokens: int, stop_early: bool) -> list[bool]:
        from abliterate.model.generation import answer_text, greedy_generate
        from abliterate.refusal import is_refusal

        stop = None
        if stop_early:
            from abliterate.refusal import refusal_stop

            stop = refusal_stop(self.tokenizer, set(range(len(ids))))
        answers = greedy_generate(self.model, ids, max_new_tokens=max_new_tokens, eos_ids=self.eos,
                                  pad_id=self.pad, batch_size=self.batch_size, device=self.device, stop_early=stop)
        return [is_refusal(answer_text(self.tokenizer, a)) for a in answers]
