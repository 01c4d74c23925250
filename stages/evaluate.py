"""Stage ``evaluate``: the ablated model against the baseline -- refusal rates, over-refusal, KL, a report.

It renders nothing: it reuses the baseline's token ids, generation settings and stop ids, so the two
models answer exactly the same inputs. Metrics (``metrics/eval.json``, flat numbers for
``dvc exp show``):

  * ``refusal_rate_before`` / ``refusal_rate_after``: share of harmful eval prompts refused by the
    base / ablated model; ``over_refusal_rate_before`` / ``_after``: the same on harmless prompts.
    Both verdicts come from ``stages.refusal`` now (the base's stored answers are re-judged, so a
    change of the marker list moves before and after together); an empty answer is a refusal and is
    also counted in ``empty_answers_before`` / ``_after``;
  * ``kl_first_token``: mean over harmless prompts of KL(base || ablated) of the first answer token,
    full vocabulary, natural log (the number heretic reports);
  * ``kl_answer``: mean per-token KL(base || ablated) along the base's own answer (teacher-forced,
    first ``kl-tokens`` tokens of each harmless answer, pooled over all those tokens), over the base's
    top-k tokens plus one "rest" category -- a lower bound of the full-vocabulary KL.

``reports/eval.md`` has the table and answers side by side: the harmful prompts whose verdict
changed first, the harmless prompts with a changed verdict or the largest first-token KL.

Heretic-compatible line (``heretic_*`` metrics): refusals among the first 100 harmful eval prompts
with answers of 100 tokens, and the mean first-token KL over the first 100 harmless eval prompts,
the protocol heretic's published numbers use (fewer prompts if a file has fewer). The answers are
this stage's own, continued greedily to 100 tokens where the token budget cut them (truncated to
100 tokens where the budget is larger), judged by this project's marker list (not heretic's 33
keywords).

``--compare FILE`` adds the numbers of another evaluate run (its ``metrics/eval.json``, e.g. of
the default heuristic before a searched ablation) as a column of the report's tables, labelled
``--compare-label``. It is display only: ``dvc exp show`` remains the way to compare experiments.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from stages.cliutil import console, fail, new_app, run_app

app = new_app(__doc__.splitlines()[0])
SHOWN = 4  # answers of each set shown in the report
HERETIC_PROMPTS = 100  # heretic's protocol: the first 100 prompts of each set ...
HERETIC_TOKENS = 100  # ... and 100 generated tokens per harmful prompt


def evaluate(model_dir: str | Path, baseline: str | Path, metrics_path: str | Path, report_path: str | Path, *,
             batch_size: int, dtype: str = "float32", device: str = "auto", compare: str | Path | None = None,
             compare_label: str = "") -> dict:
    """Answer the baseline's prompts with ``model_dir``, compare, write metrics and report; return metrics."""
    from stages.atomic import write_json, write_text
    from stages.baseline import read_baseline, refusal_stop
    from stages.generation import answer_logprobs, answer_text, greedy_generate, kl_full, kl_set_shift, kl_top_k
    from stages.generation import progress, stop_ids
    from stages.modelio import check_model_dir, load_model, load_tokenizer, pick_device
    from stages.refusal import find_refusal

    if batch_size < 1:
        fail(f"batch-size must be at least 1, got {batch_size}; set evaluate.batch-size")
    if Path(metrics_path).resolve() == Path(report_path).resolve():
        fail(f"--metrics and --report are the same file ({metrics_path}); give two paths")
    rows, meta = read_baseline(baseline)
    other = read_compare(compare, compare_label)
    check_model_dir(model_dir)
    try:
        tokenizer = load_tokenizer(model_dir)
    except (OSError, ValueError) as exc:
        fail(f"cannot load the tokenizer of {model_dir} ({type(exc).__name__}); the folder needs the base "
             "model's tokenizer files (run `dvc repro` to copy them)")
    device = pick_device(device)
    model = load_model(model_dir, dtype, device)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    if vocab != meta["vocab_size"]:
        fail(f"{model_dir} has a vocabulary of {vocab} tokens but the baseline {baseline} was made with "
             f"{meta['vocab_size']}; evaluate an ablated copy of the baseline's model ({meta['model']})")
    sets, n = rows["set"], len(rows["set"])
    harmful = {i for i in range(n) if sets[i] == "harmful"}
    eos = sorted(set(meta["eos_ids"]) | set(stop_ids(model, tokenizer)))
    start = time.perf_counter()
    with progress("evaluate: ablated model answers", n) as advance:
        answers = greedy_generate(model, rows["prompt_ids"], max_new_tokens=meta["max_new_tokens"], eos_ids=eos,
                                  pad_id=meta["pad_id"], batch_size=batch_size, device=device, advance=advance,
                                  stop_early=refusal_stop(tokenizer, harmful))
    after_text = [answer_text(tokenizer, a) for a in answers]
    before_why = [find_refusal(t) for t in rows["answer"]]
    after_why = [find_refusal(t) for t in after_text]

    harmless = [i for i in range(n) if sets[i] == "harmless"]
    openers = refusal_openers(rows["answer_ids"], before_why)
    kl_first: dict[int, float] = {}
    kl_openers: list[float] = []
    kl_tokens: list[float] = []
    with progress("evaluate: KL on harmless prompts", len(harmless)) as advance:
        for k, logprobs in answer_logprobs(model, [rows["prompt_ids"][i] for i in harmless],
                                           [rows["answer_ids"][i] for i in harmless], n_tokens=meta["kl_tokens"],
                                           pad_id=meta["pad_id"], batch_size=batch_size, device=device):
            i = harmless[k]
            kl_first[i] = kl_full(rows["first_logprobs"][i], logprobs[0])
            kl_openers.append(kl_set_shift(rows["first_logprobs"][i], logprobs[0], openers))
            kl_tokens += kl_top_k(rows["kl_ids"][i], rows["kl_logprobs"][i], rows["kl_tail"][i], logprobs)
            advance(1)
    metrics = compute_metrics(sets, before_why, after_why, rows["answer"], after_text, list(kl_first.values()),
                              kl_tokens, kl_openers)
    metrics.update(heretic_line(model, tokenizer, rows, meta, answers, kl_first, eos, batch_size, device))
    report = render_report(rows, meta, after_text, before_why, after_why, kl_first, metrics,
                           after_stop=[a.stop for a in answers], model_dir=str(model_dir), baseline=str(baseline),
                           compare=other, openers=[tokenizer.decode([t]) for t in openers])
    write_json(metrics_path, metrics)
    write_text(report_path, report)
    _log(metrics, time.perf_counter() - start)
    return metrics


def heretic_line(model, tokenizer, rows: dict, meta: dict, answers: list, kl_first: dict[int, float], eos: list[int],
                 batch_size: int, device: str) -> dict:
    """``heretic_*`` metrics: refusals of the first 100 harmful prompts at 100 tokens, KL of the first 100 harmless.

    Answers the budget cut (stop "length") are continued greedily from prompt + answer up to 100
    tokens (stopping once a refusal is certain); longer answers are truncated to 100 tokens.
    """
    from stages.generation import Generated, answer_text, greedy_generate
    from stages.refusal import is_refusal, refusal_decided

    sets, index = rows["set"], rows["index"]
    harmful = [i for i in range(len(sets)) if sets[i] == "harmful" and index[i] < HERETIC_PROMPTS]
    harmless = [i for i in range(len(sets)) if sets[i] == "harmless" and index[i] < HERETIC_PROMPTS and i in kl_first]
    ids = {i: list(answers[i].ids[:HERETIC_TOKENS]) for i in harmful}
    cut = [i for i in harmful if answers[i].stop == "length" and len(ids[i]) < HERETIC_TOKENS]
    if cut:
        def decided(k: int, more: list[int]) -> bool:
            return refusal_decided(tokenizer.decode(ids[cut[k]] + more, skip_special_tokens=True))

        more = greedy_generate(model, [list(rows["prompt_ids"][i]) + ids[i] for i in cut],
                               max_new_tokens=HERETIC_TOKENS - meta["max_new_tokens"], eos_ids=eos,
                               pad_id=meta["pad_id"], batch_size=batch_size, device=device, stop_early=decided)
        for i, extra in zip(cut, more):
            ids[i] = ids[i] + extra.ids
    texts = {i: answer_text(tokenizer, Generated(ids=ids[i], stop="eos" if ids[i] and ids[i][-1] in eos else "length"))
             for i in harmful}
    return {
        "heretic_refusals": sum(1 for i in harmful if is_refusal(texts[i])),
        "heretic_prompts": len(harmful),
        "heretic_kl_first_token": _sig(sum(kl_first[i] for i in harmless) / len(harmless)) if harmless else 0.0,
        "heretic_kl_prompts": len(harmless),
    }


def refusal_openers(answer_ids: list, why: list) -> list[int]:
    """The distinct first tokens of the base answers judged refusals (``why`` not None), sorted."""
    return sorted({int(ids[0]) for ids, reason in zip(answer_ids, why) if reason is not None and len(ids)})


def read_compare(path: str | Path | None, label: str = "") -> dict | None:
    """The metrics of another evaluate run to show beside this one (None without ``path``)."""
    import json

    if path is None or not str(path).strip():
        return None
    path = Path(path)
    if not path.is_file():
        fail(f"comparison metrics {path} do not exist; give a metrics/eval.json saved from another run")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        fail(f"comparison metrics {path} are not valid JSON ({exc}); give a metrics/eval.json of another run")
    needed = ("refusal_rate_after", "over_refusal_rate_after", "kl_first_token", "kl_answer", "prompts_harmful",
              "prompts_harmless")
    if not isinstance(metrics, dict) or any(k not in metrics for k in needed):
        fail(f"{path} is not a metrics file written by evaluate (it lacks {', '.join(needed)})")
    return {"label": label or path.stem, "metrics": metrics}


def _sig(value: float) -> float:
    """Six significant digits: readable in ``dvc exp show``, still meaningful for tiny KLs."""
    return float(f"{value:.6g}")


def compute_metrics(sets: list[str], before_why: list, after_why: list, before_text: list[str],
                    after_text: list[str], kl_first: list[float], kl_tokens: list[float],
                    kl_openers: list[float] | None = None) -> dict:
    """The flat metrics dictionary (rates in [0, 1], KL in nats, counts as integers).

    ``kl_openers``: per harmless prompt, the part of its first-token KL that is the probability of
    the refusal openers moving (:func:`stages.generation.kl_set_shift`); reported as
    ``kl_first_token_openers`` when given.
    """
    def rate(name: str, why: list) -> float:
        rows = [i for i, s in enumerate(sets) if s == name]
        return _sig(sum(why[i] is not None for i in rows) / len(rows)) if rows else 0.0

    metrics = {
        "refusal_rate_before": rate("harmful", before_why),
        "refusal_rate_after": rate("harmful", after_why),
        "over_refusal_rate_before": rate("harmless", before_why),
        "over_refusal_rate_after": rate("harmless", after_why),
        "kl_first_token": _sig(sum(kl_first) / len(kl_first)) if kl_first else 0.0,
        "kl_answer": _sig(sum(kl_tokens) / len(kl_tokens)) if kl_tokens else 0.0,
        "kl_answer_tokens": len(kl_tokens),
        "prompts_harmful": sum(s == "harmful" for s in sets),
        "prompts_harmless": sum(s == "harmless" for s in sets),
        "empty_answers_before": sum(1 for t in before_text if not t.strip()),
        "empty_answers_after": sum(1 for t in after_text if not t.strip()),
    }
    if kl_openers is not None:
        metrics["kl_first_token_openers"] = _sig(sum(kl_openers) / len(kl_openers)) if kl_openers else 0.0
    return metrics


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
    """Rows to show: per set, changed verdicts first (in file order), then harmless rows by largest KL."""
    picked: dict[str, list[int]] = {}
    for name in ("harmful", "harmless"):
        rows = [i for i, s in enumerate(sets) if s == name]
        changed = [i for i in rows if (before_why[i] is None) != (after_why[i] is None)]
        rest = sorted((i for i in rows if i not in changed), key=lambda i: (-kl_first.get(i, 0.0), i))
        picked[name] = (changed + rest)[:shown]
    return picked


def render_report(rows: dict, meta: dict, after_text, before_why, after_why, kl_first, metrics, *,
                  after_stop: list[str], model_dir: str, baseline: str, compare: dict | None = None,
                  openers: list[str] | None = None) -> str:
    """``reports/eval.md``: the metrics table and a few answers side by side."""
    def pct(name: str, rate: str, why: list) -> str:
        total = metrics[f"prompts_{name}"]
        count = sum(1 for i, s in enumerate(rows["set"]) if s == name and why[i] is not None)
        return f"{100 * metrics[rate]:.1f}% ({count}/{total})"

    m = metrics
    o = compare["metrics"] if compare else None

    def other(text: str) -> str:  # the comparison column (empty without --compare)
        return f" {text} |" if o is not None else ""

    def other_pct(name: str, rate: str) -> str:
        total = o.get(f"prompts_{name}", 0)
        return other(f"{100 * o[rate]:.1f}% ({round(o[rate] * total)}/{total})")

    def other_num(key: str, fmt: str = ".6g") -> str:
        return other(format(o[key], fmt) if key in o else "–")

    label = other(compare["label"]) if compare else ""
    align = other("---:") if compare else ""
    lines = [
        "# Evaluation", "",
        f"Ablated model `{model_dir}` against the base model `{meta['model']}` (baseline `{baseline}`): "
        f"{m['prompts_harmful']} harmful and {m['prompts_harmless']} harmless held-out prompts, greedy answers "
        f"of at most {meta['max_new_tokens']} tokens (\u2026 marks an answer cut by that budget, or a harmful one "
        "stopped once its refusal was certain); KL measured on the harmless prompts."
        + (f" The column `{compare['label']}` shows the metrics of another run, for comparison." if compare else ""),
        "",
        f"| metric | base |{label} ablated |", f"|---|---:|{align}---:|",
        f"| refusal rate (harmful) | {pct('harmful', 'refusal_rate_before', before_why)} |"
        f"{other_pct('harmful', 'refusal_rate_after') if o else ''} "
        f"{pct('harmful', 'refusal_rate_after', after_why)} |",
        f"| over-refusal rate (harmless) | {pct('harmless', 'over_refusal_rate_before', before_why)} |"
        f"{other_pct('harmless', 'over_refusal_rate_after') if o else ''} "
        f"{pct('harmless', 'over_refusal_rate_after', after_why)} |",
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

        lines += [f"Heretic-compatible line (first {HERETIC_PROMPTS} harmful prompts answered with {HERETIC_TOKENS} "
                  f"tokens, first-token KL over the first {HERETIC_PROMPTS} harmless prompts; this project's refusal "
                  "markers):", "", f"| |{label} ablated |", f"|---|{align}---:|",
                  f"| heretic protocol |{other(heretic(o)) if o else ''} {heretic(m)} |", ""]
    if m["empty_answers_after"]:
        lines += [f"**Warning:** the ablated model generated nothing for {m['empty_answers_after']} of "
                  f"{m['prompts_harmful'] + m['prompts_harmless']} prompts; they count as refusals.", ""]
    picked = pick_examples(rows["set"], before_why, after_why, kl_first)
    for name in ("harmful", "harmless"):
        lines += [f"## {name.capitalize()} prompts", ""]
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


def _log(metrics: dict, seconds: float) -> None:
    from rich.table import Table

    table = Table(title="evaluate", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(metrics.items()):
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    log = console()
    log.print(table)
    if metrics["empty_answers_after"]:
        log.print(f"[yellow]warning:[/] the ablated model generated nothing for {metrics['empty_answers_after']} "
                  "prompts (counted as refusals)")
    log.print(f"evaluate: done in {seconds:.1f} s")


@app.command()
def main(
    model: Path = typer.Option(..., help="Ablated model folder (Hugging Face layout)."),
    baseline: Path = typer.Option(..., help="Baseline parquet written by the baseline stage."),
    metrics: Path = typer.Option(..., help="Output metrics JSON."),
    report: Path = typer.Option(..., help="Output Markdown report."),
    batch_size: int = typer.Option(16, help="Prompts per batch."),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16 or auto."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, mps."),
    compare: str = typer.Option("", help="metrics/eval.json of another run, shown beside this one in the report."),
    compare_label: str = typer.Option("", help="Column title of --compare (default: its file name)."),
) -> None:
    """Refusal rates before/after, over-refusal, first-token and answer KL of the ablated model; a report."""
    evaluate(model, baseline, metrics, report, batch_size=batch_size, dtype=dtype, device=device, compare=compare,
             compare_label=compare_label)


if __name__ == "__main__":
    run_app(app)
