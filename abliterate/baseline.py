"""The baseline: the base model's answers and KL references on the held-out eval prompts.

Greedy answers to every eval prompt (harmful and borderline answers stop early once they are
decided refusals, :func:`abliterate.refusal.refusal_decided`: the verdict cannot change), the
full first-token distributions on the plain harmless prompts, and the top-k log-probabilities
along the first ``kl_tokens`` tokens of each plain harmless answer (k = 256 recovered 95% of the full per-token KL on
SmolLM2-135M with perturbed weights; k = 64: 88%, k = 8: 67%). Written as
:mod:`abliterate.formats.baseline_table`, which holds everything ``evaluate`` needs.
"""

from __future__ import annotations

from pathlib import Path

from abliterate.errors import fail
from abliterate.progress import PLAIN, Reporter


def check_settings(max_new_tokens: int, kl_tokens: int, batch_size: int, top_k: int) -> None:
    if not 1 <= max_new_tokens <= 8192:
        fail(f"max-new-tokens must be between 1 and 8192, got {max_new_tokens}; set evaluate.max-new-tokens")
    if not 1 <= kl_tokens <= max_new_tokens:
        fail(f"kl-tokens must be between 1 and max-new-tokens ({max_new_tokens}), got {kl_tokens}; "
             "set evaluate.kl-tokens")
    if batch_size < 1:
        fail(f"batch-size must be at least 1, got {batch_size}; set evaluate.batch-size")
    if top_k < 1:
        fail(f"top-k must be at least 1, got {top_k}")


def build_baseline(model_dir: str | Path, harmful: str, harmless: str, out: str | Path, *, max_new_tokens: int,
                   kl_tokens: int, batch_size: int, borderline: str | None = None, dtype: str = "auto",
                   device: str = "auto", system_prompt: str = "", chat_template: str = "", top_k: int = 256,
                   streaming: str = "auto", max_prompt_tokens: int = 4096,
                   report: Reporter = PLAIN) -> tuple[dict, list[dict]]:
    """Generate the base model's answers, compute the KL references, write ``out``.

    ``harmless``: plain requests (the KL references are taken on them); ``borderline``: edgy but
    harmless requests (over-refusal; optional). Returns the file's metadata and a summary per set
    (prompts, refused, empty answers, mean tokens)."""
    from abliterate.formats.baseline_table import SETS, write_baseline
    from abliterate.kl import top_k_summary
    from abliterate.model.generation import answer_logprobs, answer_text, greedy_generate, stop_ids
    from abliterate.model.modelio import check_model_dir, load_tokenizer, pick_device, read_config
    from abliterate.model.prompt_limits import render_checked, token_limit
    from abliterate.model.streaming import opened, resolve_dtype
    from abliterate.model.prompts import load_prompts, prompts_hash, resolve_template, template_hash
    from abliterate.refusal import is_refusal, refusal_stop

    check_settings(max_new_tokens, kl_tokens, batch_size, top_k)
    files = {"harmful": harmful, "harmless": harmless, "borderline": borderline}
    texts = {name: load_prompts(path) for name, path in files.items() if path is not None}
    check_model_dir(model_dir)
    tokenizer = load_tokenizer(model_dir)
    template = resolve_template(tokenizer, chat_template)
    used = [s for s in SETS if s in texts]
    sets = [s for s in used for _ in texts[s]]
    index = [i for s in used for i in range(len(texts[s]))]
    # prompt and answer must fit the context: checked before any model is loaded
    limit = token_limit(read_config(model_dir), max_prompt_tokens, new_tokens=max_new_tokens)
    prompt_ids = [ids for s in used for ids in render_checked(tokenizer, texts[s], str(files[s]), limit,
                                                              system_prompt, chat_template)]
    device = pick_device(device)
    dtype = resolve_dtype(dtype, device, Path(model_dir))
    with opened(Path(model_dir), dtype, device, streaming, "baseline", report, Path(out).parent) as model:
        eos, pad_id = stop_ids(model, tokenizer), int(tokenizer.pad_token_id)
        judged = {i for i, s in enumerate(sets) if s != "harmless"}  # harmful and borderline: only the verdict
        with report.task("baseline: base model answers", total=len(prompt_ids)) as task:
            answers = greedy_generate(model, prompt_ids, max_new_tokens=max_new_tokens, eos_ids=eos, pad_id=pad_id,
                                      batch_size=batch_size, device=device, advance=task.advance,
                                      stop_early=refusal_stop(tokenizer, judged))
        texts_out = [answer_text(tokenizer, a) for a in answers]
        refused = [is_refusal(t) for t in texts_out]

        harmless_rows = [i for i, s in enumerate(sets) if s == "harmless"]
        first: dict[int, object] = {}  # row -> [vocab] fp32 numpy array
        along: dict[int, tuple] = {}
        with report.task("baseline: log-probabilities", total=len(harmless_rows)) as task:
            for k, logprobs in answer_logprobs(model, [prompt_ids[i] for i in harmless_rows],
                                               [answers[i].ids for i in harmless_rows], n_tokens=kl_tokens,
                                               pad_id=pad_id, batch_size=batch_size, device=device):
                row = harmless_rows[k]
                first[row] = logprobs[0].numpy()
                ids, values, tail = top_k_summary(logprobs, top_k)
                along[row] = (ids.tolist(), values.tolist(), tail.tolist())
                task.advance(1)
        vocab = int(next(iter(first.values())).shape[0])
        meta = {
            "model": str(model_dir), "model_type": model.config.model_type,
            "vocab_size": vocab, "max_new_tokens": max_new_tokens, "kl_tokens": kl_tokens, "top_k": min(top_k, vocab),
            "dtype": dtype, "system_prompt": system_prompt, "chat_template": chat_template,
            "template_sha256": template_hash(template), "eos_ids": eos, "pad_id": pad_id,
            "prompts": {s: {"file": str(files[s]), "count": len(texts[s]), "sha256": prompts_hash(texts[s])}
                        for s in used},
        }
    write_baseline(out, sets, index, [t for s in used for t in texts[s]], prompt_ids, answers, texts_out, refused,
                   first, along, meta)
    summary = []
    for name in used:
        rows = [i for i, s in enumerate(sets) if s == name]
        summary.append({"set": name, "prompts": len(rows), "refused": sum(refused[i] for i in rows),
                        "empty": sum(1 for i in rows if not texts_out[i].strip()),
                        "mean_tokens": sum(len(answers[i].ids) for i in rows) / max(1, len(rows))})
    return meta, summary
