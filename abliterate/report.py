"""``reports/eval.md``: the evaluation's metrics table and a few answers side by side (Markdown).

Per set (harmful, borderline, plain harmless), the prompts whose verdict changed come first, then
(plain harmless) the largest first-token KL. ``compare`` adds the numbers of another evaluate run as a
column of the tables (display only: ``dvc exp show`` remains the way to compare experiments).
"""

from __future__ import annotations

SHOWN = 4  # answers of each set shown in the report


def read_compare(path, label: str = "") -> dict | None:
    """The metrics of another evaluate run to show beside this one (None without ``path``)."""
    from pathlib import Path

    from abliterate.formats.metrics import read_eval_metrics

    if path is None or not str(path).strip():
        return None
    return {"label": label or Path(path).stem, "metrics": read_eval_metrics(path)}


def _cell(text: str, limit: int = 600) -> str:
    import unicodedata

    text = "".join(ch if ch in "\n\r\t" or unicodedata.category(ch) != "Cc" else "\ufffd" for ch in text.strip())
    text = text if len(text) <= limit else text[:limit] + " …"
    if not text:
        return "*(empty answer)*"
    for old, new in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "\\|"), ("\r", ""), ("\n", "<br>")):
        text = text.replace(old, new)
    return text


def _answer(text: str, stop: str) -> str:
    """A table cell with the answer; "…" marks one cut by the token budget or by an early refusal stop."""
    return _cell(text) + (" …" if text.strip() and stop in ("length", "early") else "")


def _verdict(why) -> str:
    return "answered" if why is None else f"**refused** ({why})"


def pick_examples(sets, before_why, after_why, kl_first: dict[int, float], shown: int = SHOWN) -> dict[str, list[int]]:
    """Rows to show: per set present, changed verdicts first (in file order), then plain harmless rows by
    largest KL."""
    picked: dict[str, list[int]] = {}
    for name in [n for n in ("harmful", "borderline", "harmless") if n in sets]:
        rows = [i for i, s in enumerate(sets) if s == name]
        changed = [i for i in rows if (before_why[i] is None) != (after_why[i] is None)]
        rest = sorted((i for i in rows if i not in changed), key=lambda i: (-kl_first.get(i, 0.0), i))
        picked[name] = (changed + rest)[:shown]
    return picked


def render_report(rows: dict, meta: dict, after_text, before_why, after_why, kl_first, metrics, *,
                  after_stop: list[str], model_dir: str, baseline: str, compare: dict | None = None,
                  openers: list[str] | None = None, heretic_protocol: tuple[int, int] = (100, 100)) -> str:
    """``reports/eval.md``: the metrics table and a few answers side by side.

    ``heretic_protocol``: the prompts and answer tokens of the heretic-compatible line."""
    def pct(name: str, rate: str, why: list) -> str:
        total = metrics[f"prompts_{name}"]
        count = sum(1 for i, s in enumerate(rows["set"]) if s == name and why[i] is not None)
        return f"{100 * metrics[rate]:.1f}% ({count}/{total})"

    m = metrics
    o = compare["metrics"] if compare else None

    def other(text: str) -> str:  # the comparison column (empty without --compare)
        return f" {text} |" if o is not None else ""

    def other_pct(name: str, rate: str) -> str:
        if rate not in o:
            return other("–")
        total = o.get(f"prompts_{name}", 0)
        return other(f"{100 * o[rate]:.1f}% ({round(o[rate] * total)}/{total})")

    def rate_row(title: str, name: str, rate: str) -> list[str]:
        if f"{rate}_after" not in m:
            return []
        return [f"| {title} | {pct(name, f'{rate}_before', before_why)} |"
                f"{other_pct(name, f'{rate}_after') if o else ''} {pct(name, f'{rate}_after', after_why)} |"]

    def other_num(key: str, fmt: str = ".6g") -> str:
        return other(format(o[key], fmt) if key in o else "–")

    label = other(compare["label"]) if compare else ""
    align = other("---:") if compare else ""
    lines = [
        "# Evaluation", "",
        f"Ablated model `{model_dir}` against the base model `{meta['model']}` (baseline `{baseline}`): "
        f"{m['prompts_harmful']} harmful, {m['prompts_harmless']} plain harmless and {m.get('prompts_borderline', 0)} "
        f"borderline (edgy but harmless) held-out prompts, greedy answers of at most {meta['max_new_tokens']} tokens "
        "(\u2026 marks an answer cut by that budget, or one stopped once its refusal was certain); KL measured on the "
        "plain harmless prompts, over-refusal on the borderline ones."
        + (f" The column `{compare['label']}` shows the metrics of another run, for comparison." if compare else ""),
        "",
        f"| metric | base |{label} ablated |", f"|---|---:|{align}---:|",
        *rate_row("refusal rate (harmful)", "harmful", "refusal_rate"),
        *rate_row("over-refusal rate (borderline)", "borderline", "over_refusal_rate"),
        *rate_row("refusals of plain harmless prompts", "harmless", "plain_refusal_rate"),
        f"| empty answers (counted as refusals) | {m['empty_answers_before']} |"
        f"{other_num('empty_answers_after', 'd') if o else ''} {m['empty_answers_after']} |", "",
        f"| KL(base ‖ ablated), nats |{label} mean |", f"|---|{align}---:|",
        f"| first answer token, full vocabulary |{other_num('kl_first_token') if o else ''} "
        f"{m['kl_first_token']:.6g} |",
        *([f"| … of which the refusal openers' total probability moving ({_openers(openers)}) |"
           f"{other_num('kl_first_token_openers') if o else ''} {m['kl_first_token_openers']:.6g} |"]
          if "kl_first_token_openers" in m and openers is not None else []),
        f"| per token along the base answer (first {meta['kl_tokens']} tokens, top-{meta['top_k']} + rest) |"
        f"{other_num('kl_answer') if o else ''} {m['kl_answer']:.6g} |", "",
    ]
    if "heretic_refusals" in m:
        def heretic(x: dict) -> str:
            if "heretic_refusals" not in x:
                return "–"
            return f"{x['heretic_refusals']}/{x['heretic_prompts']} refusals, KL {x['heretic_kl_first_token']:.4g}"

        prompts, tokens = heretic_protocol
        lines += [f"Heretic-compatible line (first {prompts} harmful prompts answered with {tokens} "
                  f"tokens, first-token KL over the first {prompts} plain harmless prompts; this project's refusal "
                  "markers):", "", f"| |{label} ablated |", f"|---|{align}---:|",
                  f"| heretic protocol |{other(heretic(o)) if o else ''} {heretic(m)} |", ""]
    if m["empty_answers_after"]:
        lines += [f"**Warning:** the ablated model generated nothing for {m['empty_answers_after']} of "
                  f"{len(rows['set'])} prompts; they count as refusals.", ""]
    picked = pick_examples(rows["set"], before_why, after_why, kl_first)
    titles = {"harmful": "Harmful prompts", "borderline": "Borderline prompts", "harmless": "Plain harmless prompts"}
    for name in [n for n in titles if n in picked]:
        lines += [f"## {titles[name]}", ""]
        for i in picked[name]:
            kl = f" · first-token KL {kl_first[i]:.4g}" if i in kl_first else ""
            lines += [f"**{rows['index'][i] + 1}.** {_cell(rows['text'][i], 300)}{kl}", "",
                      "| base | ablated |", "|---|---|",
                      f"| {_verdict(before_why[i])} | {_verdict(after_why[i])} |",
                      f"| {_answer(rows['answer'][i], rows['stop'][i])} | {_answer(after_text[i], after_stop[i])} |",
                      ""]
    return "\n".join(lines)


def _openers(openers: list[str], shown: int = 6) -> str:
    """The report's list of refusal openers: the first ``shown`` in backquotes, then a count of the rest."""
    if not openers:
        return "none: the base model refused nothing"
    cells = ["`" + (_cell(t, 20) if t.strip() else repr(t)).replace("`", "'") + "`" for t in openers[:shown]]
    more = f" and {len(openers) - shown} more" if len(openers) > shown else ""
    return ", ".join(cells) + more
