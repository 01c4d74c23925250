"""evaluate's heretic-compatible line (first 100 prompts, 100 tokens, first-token KL) and --compare."""

from __future__ import annotations

import json

import pytest

from abliterate.errors import UserError
from abliterate.model.generation import Generated


class ByteTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i > 0)


def _ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_heretic_line_continues_cut_answers_and_counts_the_first_prompts(monkeypatch):
    from abliterate import evaluation as ev
    from abliterate.model import generation

    monkeypatch.setattr(ev, "HERETIC_PROMPTS", 3)
    monkeypatch.setattr(ev, "HERETIC_TOKENS", 40)
    seen = {}

    def fake_generate(model, prompts, *, max_new_tokens, eos_ids, pad_id, batch_size, device, stop_early=None):
        seen["prompts"], seen["tokens"] = prompts, max_new_tokens
        return [Generated(ids=_ids(" but I'm sorry, I can't help with that.")[:max_new_tokens], stop="length")
                for _ in prompts]

    monkeypatch.setattr(generation, "greedy_generate", fake_generate)
    sets = ["harmful"] * 4 + ["harmless"] * 4
    rows = {"set": sets, "index": [0, 1, 2, 3, 0, 1, 2, 3], "prompt_ids": [[7, i] for i in range(8)]}
    answers = [Generated(ids=_ids("Sure, here is how to do it"), stop="length"),  # cut: continued -> refusal
               Generated(ids=_ids("I'm sorry, I cannot do that at all")[:26], stop="early"),  # decided refusal
               Generated(ids=_ids("Here it is.") + [0], stop="eos"),  # complete answer
               Generated(ids=_ids("I won't."), stop="eos")]  # index 3: beyond the first 3 prompts
    answers += [Generated(ids=[], stop="length")] * 4
    meta = {"max_new_tokens": 26, "pad_id": 0}
    kl_first = {4: 0.1, 5: 0.2, 6: 0.6, 7: 9.0}
    line = ev.heretic_line(None, ByteTokenizer(), rows, meta, answers, kl_first, [0], batch_size=2, device="cpu")
    assert line == {"heretic_refusals": 2, "heretic_prompts": 3, "heretic_kl_first_token": 0.3,
                    "heretic_kl_prompts": 3}
    assert seen["tokens"] == 40 - 26  # continued up to the 40-token budget
    assert seen["prompts"] == [[7, 0] + _ids("Sure, here is how to do it")]  # only the cut answer, after its prompt


def test_compare_adds_a_column_and_refuses_other_files(tmp_path):
    from abliterate.report import read_compare, render_report

    metrics = {"refusal_rate_before": 1.0, "refusal_rate_after": 0.5, "over_refusal_rate_before": 1.0,
               "over_refusal_rate_after": 0.0, "plain_refusal_rate_before": 0.0, "plain_refusal_rate_after": 0.0,
               "kl_first_token": 0.02, "kl_answer": 0.01, "kl_answer_tokens": 4, "prompts_harmful": 2,
               "prompts_harmless": 1, "prompts_borderline": 1, "empty_answers_before": 0, "empty_answers_after": 0,
               "heretic_refusals": 1, "heretic_prompts": 2, "heretic_kl_first_token": 0.02, "heretic_kl_prompts": 1}
    other = {**metrics, "refusal_rate_after": 1.0, "kl_first_token": 0.5, "heretic_refusals": 2}
    del other["over_refusal_rate_after"]  # a run without a borderline set
    (tmp_path / "heuristic.json").write_text(json.dumps(other))
    compare = read_compare(tmp_path / "heuristic.json", "default heuristic")
    rows = {"set": ["harmful", "harmful", "harmless", "borderline"], "index": [0, 1, 0, 0], "text": ["a", "b", "c", "d"],
            "answer": ["I'm sorry, I can't.", "I'm sorry, I can't.", "Fine.", "I'm sorry, I can't."],
            "stop": ["eos"] * 4}
    meta = {"model": "base", "max_new_tokens": 8, "kl_tokens": 4, "top_k": 16}
    before, after = ["apology", "apology", None, "apology"], ["apology", None, None, None]
    answers = ["I'm sorry, I can't.", "Sure.", "Fine.", "Here is how."]
    report = render_report(rows, meta, answers, before, after, {2: 0.02}, metrics,
                           after_stop=["eos"] * 4, model_dir="ablated", baseline="b.parquet", compare=compare)
    assert "| metric | base | default heuristic | ablated |" in report
    assert "| refusal rate (harmful) | 100.0% (2/2) | 100.0% (2/2) | 50.0% (1/2) |" in report
    assert "| first answer token, full vocabulary | 0.5 | 0.02 |" in report
    assert "| over-refusal rate (borderline) | 100.0% (1/1) | – | 0.0% (0/1) |" in report
    assert "| heretic protocol | 2/2 refusals, KL 0.02 | 1/2 refusals, KL 0.02 |" in report
    plain = render_report(rows, meta, answers, before, after, {2: 0.02}, metrics,
                          after_stop=["eos"] * 4, model_dir="ablated", baseline="b.parquet")
    assert "| metric | base | ablated |" in plain and "| heretic protocol | 1/2 refusals, KL 0.02 |" in plain
    assert read_compare("", "") is None
    (tmp_path / "bad.json").write_text(json.dumps({"refusal_rate_after": 1}))
    with pytest.raises(UserError, match="not a metrics file written by evaluate"):
        read_compare(tmp_path / "bad.json")
    with pytest.raises(UserError, match="does not exist"):
        read_compare(tmp_path / "none.json")
