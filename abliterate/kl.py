"""KL divergences between a base model's next-token distributions and another model's (nats, fp64).

* :func:`kl_rows` / :func:`kl_full`: the full-vocabulary KL(base || other), per row / of one pair;
* :func:`kl_set_shift`: the part of it that is the total probability of a set of tokens moving;
* :func:`top_k_summary` and :func:`kl_top_k`: a compressed base distribution (top-k plus the tail
  mass) and the (k+1)-category KL it allows, a lower bound of the full one.

Log-probabilities are clamped at -1e4 so that a token the other model rules out (-inf) gives a
large finite term rather than infinity.
"""

from __future__ import annotations

FLOOR = -1e4  # log-probabilities are clamped here


def kl_rows(base_logprobs, other_logprobs):
    """KL(base || other) of each row of two ``[n, vocab]`` log-probability arrays: a fp64 tensor ``[n]``."""
    import torch

    p_log = torch.as_tensor(base_logprobs, dtype=torch.float64)
    q_log = torch.as_tensor(other_logprobs, dtype=torch.float64).clamp(min=FLOOR)
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log.clamp(min=FLOOR) - q_log), torch.zeros_like(p))
    return terms.sum(dim=-1).clamp(min=0.0)


def kl_full(base_logprobs, other_logprobs) -> float:
    """KL(base || other) between two full distributions given as log-probabilities ``[vocab]``."""
    return float(kl_rows(base_logprobs, other_logprobs))


def kl_set_shift(base_logprobs, other_logprobs, ids: list[int]) -> float:
    """The part of KL(base || other) that is the total probability of the tokens ``ids`` moving.

    With ``p_S``, ``q_S`` the probability both put on the set, the chain rule splits the KL exactly:
    ``KL(p||q) = KL([p_S, 1-p_S] || [q_S, 1-q_S]) + p_S KL(p|S || q|S) + (1-p_S) KL(p|not S || q|not S)``.
    This returns the first, two-outcome term (nats, fp64; 0 <= it <= :func:`kl_full`); 0 for no ``ids``.
    """
    import math

    import torch

    if not ids:
        return 0.0
    index = torch.as_tensor(sorted(set(ids)), dtype=torch.long)
    split = []  # [log p_S, log (1 - p_S)] of base, then of other: two-outcome distributions
    for logprobs in (base_logprobs, other_logprobs):
        inside = min(float(torch.logsumexp(torch.as_tensor(logprobs, dtype=torch.float64)[index], dim=0)), 0.0)
        outside = math.log1p(-math.exp(inside)) if inside < 0.0 else float("-inf")
        split.append([inside, outside])
    return kl_full(split[0], split[1])


def top_k_summary(logprobs, k: int):
    """Compress ``[n, vocab]`` log-probabilities to top-k ids ``[n, k]``, their log-probs ``[n, k]``
    and the log of the remaining (tail) mass ``[n]`` (-inf when nothing is left)."""
    import torch

    lp = torch.as_tensor(logprobs, dtype=torch.float32)
    k = min(k, lp.shape[-1])
    values, ids = torch.topk(lp, k, dim=-1)  # sorted, ties to the lower id
    rest = lp.double().scatter(-1, ids, float("-inf"))
    return ids.to(torch.int32), values, torch.logsumexp(rest, dim=-1)  # [n, k], [n, k] fp32, [n] fp64


def kl_top_k(ids, base_top, base_tail, other_logprobs) -> list[float]:
    """Per-position KL(base || other) over k+1 categories (the base's top-k tokens and the rest).

    Merging categories never increases a KL (log-sum inequality), so this is a lower bound of the
    full-vocabulary KL; it is exact when the base's top-k mass is 1.
    """
    import torch

    ids = torch.as_tensor(ids, dtype=torch.long)  # [n, k]
    p_log = torch.cat([torch.as_tensor(base_top, dtype=torch.float64),
                       torch.as_tensor(base_tail, dtype=torch.float64)[:, None]], dim=1)  # [n, k+1]
    q = torch.as_tensor(other_logprobs, dtype=torch.float64)  # [n, vocab]
    q_top = q.gather(-1, ids)
    q_tail = torch.logsumexp(q.scatter(-1, ids, float("-inf")), dim=-1)
    q_log = torch.cat([q_top, q_tail[:, None]], dim=1)
    return [float(v) for v in kl_rows(p_log, q_log)]
