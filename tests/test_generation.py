"""Batched greedy generation and teacher-forced log-probabilities, checked against transformers itself."""

from __future__ import annotations

import pytest

from tests.tiny import make_model

TEXTS = ["hello there", "a", "what is the capital of france?", "xyz xyz", "tell me a story about a cat"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["llama", "gemma3", "qwen3_next"])
def tiny(request, tmp_path_factory):
    from abliterate.model.modelio import load_model, load_tokenizer

    path = make_model(request.param, tmp_path_factory.mktemp(request.param) / "m", layers=2)
    tokenizer = load_tokenizer(path)
    prompts = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    return load_model(path, "float32", "cpu"), tokenizer, prompts


def _generate(model, prompts, **kw):
    from abliterate.model.generation import greedy_generate

    kw.setdefault("max_new_tokens", 10)
    kw.setdefault("eos_ids", [257])
    return greedy_generate(model, prompts, pad_id=258, batch_size=3, device="cpu", **kw)


def test_batched_greedy_equals_transformers_generate_one_by_one(tiny):
    import torch

    model, _, prompts = tiny
    ours = _generate(model, prompts)
    for prompt, answer in zip(prompts, ours):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=257,
                             pad_token_id=258)[0, len(prompt):].tolist()
        assert answer.ids == ref
        assert answer.stop == "length"


def test_rows_end_at_their_eos_and_the_others_continue_unchanged(tiny):
    model, _, prompts = tiny
    free = _generate(model, prompts, eos_ids=[])
    # A token that some row first produces mid-answer becomes the EOS.
    row, step = next((r, s) for r, a in enumerate(free) for s in range(1, len(a.ids)) if a.ids[s] not in a.ids[:s])
    stop_token = free[row].ids[step]
    stopped = _generate(model, prompts, eos_ids=[stop_token])
    assert stopped[row].ids == free[row].ids[: step + 1] and stopped[row].stop == "eos"
    for before, after in zip(free, stopped):  # shrinking the batch changes no other row
        if stop_token in before.ids:
            cut = before.ids.index(stop_token) + 1
            assert after.ids == before.ids[:cut] and after.stop == "eos"
        else:
            assert after.ids == before.ids and after.stop == "length"


def test_stop_early_is_asked_every_few_tokens(tiny):
    model, _, prompts = tiny
    asked = []

    def stop(row, ids):
        asked.append((row, len(ids)))
        return row == 1

    answers = _generate(model, prompts, max_new_tokens=12, eos_ids=[], stop_early=stop)
    assert answers[1].stop == "early" and len(answers[1].ids) == 8
    assert all(a.stop == "length" and len(a.ids) == 12 for i, a in enumerate(answers) if i != 1)
    assert {n for _, n in asked} == {8}


def test_answer_logprobs_match_a_plain_forward_pass(tiny):
    import torch

    from abliterate.model.generation import answer_logprobs

    model, _, prompts = tiny
    answers = [a.ids for a in _generate(model, prompts, max_new_tokens=6, eos_ids=[])]
    answers[3] = []  # an empty answer still has its first-token distribution
    got = dict(answer_logprobs(model, prompts, answers, n_tokens=4, pad_id=258, batch_size=2, device="cpu"))
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        n = max(1, min(4, len(answer)))
        assert tuple(got[i].shape) == (n, 300)
        for j in range(n):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + answer[:j]])).logits[0, -1]
            torch.testing.assert_close(got[i][j], torch.log_softmax(logits, -1), atol=2e-5, rtol=0)


def test_answer_text_drops_the_final_eos_and_stop_ids_are_united(tiny):
    from abliterate.model.generation import Generated, answer_text, stop_ids

    model, tokenizer, _ = tiny
    ids = tokenizer("ok", add_special_tokens=False)["input_ids"]
    assert answer_text(tokenizer, Generated(ids=ids + [0], stop="eos")) == "ok"  # token 0 is a byte, not special
    assert answer_text(tokenizer, Generated(ids=ids + [0], stop="length")) != "ok"
    model.generation_config.eos_token_id = [5, 257]
    assert stop_ids(model, tokenizer) == [5, 257]


def test_kl_full_matches_the_definition():
    import torch

    from abliterate.kl import kl_full

    torch.manual_seed(0)
    p, q = torch.log_softmax(torch.randn(50), 0), torch.log_softmax(torch.randn(50), 0)
    assert kl_full(p, p) == 0.0
    expected = float((p.double().exp() * (p.double() - q.double())).sum())
    assert kl_full(p, q) == pytest.approx(expected, rel=1e-12)
    assert kl_full(p, q) > 0


def test_set_shift_is_the_two_outcome_term_of_the_kl_chain_rule():
    import torch

    from abliterate.kl import kl_full, kl_set_shift

    torch.manual_seed(2)
    p, q = torch.log_softmax(2 * torch.randn(60).double(), 0), torch.log_softmax(2 * torch.randn(60).double(), 0)
    ids = [3, 17, 41]
    inside = torch.zeros(60, dtype=torch.bool)
    inside[ids] = True

    def conditional_kl(mask):  # KL(p|A || q|A)
        pa, qa = p[mask] - torch.logsumexp(p[mask], 0), q[mask] - torch.logsumexp(q[mask], 0)
        return float((pa.exp() * (pa - qa)).sum())

    p_s = float(p[inside].exp().sum())
    rest = p_s * conditional_kl(inside) + (1 - p_s) * conditional_kl(~inside)
    shift = kl_set_shift(p, q, ids)
    assert 0 < shift < kl_full(p, q)
    assert shift + rest == pytest.approx(kl_full(p, q), rel=1e-9)
    assert kl_set_shift(p, q, []) == 0.0 and kl_set_shift(p, p, ids) == 0.0

    moved = p.clone()  # the set's total probability halves, every ratio inside and outside is kept
    moved[inside] += torch.log(torch.tensor(0.5, dtype=torch.float64))
    moved[~inside] += torch.log(torch.tensor((1 - 0.5 * p_s) / (1 - p_s), dtype=torch.float64))
    assert kl_set_shift(p, moved, ids) == pytest.approx(kl_full(p, moved), rel=1e-9)
    swapped = p.clone()  # probability moved only among the set's tokens: no shift at all
    swapped[[3, 17]] = p[[17, 3]]
    assert kl_full(p, swapped) > 1e-6 and kl_set_shift(p, swapped, ids) == pytest.approx(0.0, abs=1e-12)


def test_top_k_kl_is_a_lower_bound_and_exact_with_the_whole_vocabulary():
    import torch

    from abliterate.kl import kl_full, kl_top_k, top_k_summary

    torch.manual_seed(1)
    p = torch.log_softmax(3 * torch.randn(4, 200), -1)
    q = torch.log_softmax(3 * torch.randn(4, 200), -1)
    full = [kl_full(p[i], q[i]) for i in range(4)]
    for k in (1, 5, 50):
        ids, top, tail = top_k_summary(p, k)
        assert ids.shape == (4, k) and tail.shape == (4,)
        bound = kl_top_k(ids, top, tail, q)
        assert all(0 <= b <= f + 1e-9 for b, f in zip(bound, full))
        assert kl_top_k(ids, top, tail, p) == [0.0] * 4
    ids, top, tail = top_k_summary(p, 200)
    assert kl_top_k(ids, top, tail, q) == pytest.approx(full, rel=1e-6)
