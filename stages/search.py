"""search: find the ablation that removes the most refusals for the least damage, automatically.

The study is :mod:`abliterate.search`'s (see there for the space, the scoring and the choice).
Outputs: ``search.json`` (the chosen trial's per-layer settings, which ``plan --layers search``
turns into edits, the Pareto front and every trial) and a CSV with one row per trial
(:mod:`abliterate.formats.search_result`). With ``--trials 0`` (the default) nothing is loaded:
``search.json`` just says that no search ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.cliutil import console, new_app, parse_bool, reporter, run_app

app = new_app(__doc__.split("\n")[0])


def _report(doc: dict, seconds: float, out: Path) -> None:
    from rich.table import Table

    log = reporter().message
    n, c = doc["validation"]["harmful"]["count"], doc["validation"]["confirm"]["count"]
    table = Table(title=f"search: Pareto front ({n} validation prompts per set; confirmed on {c} harmful)",
                  title_justify="left")
    b = doc["validation"].get("borderline", {}).get("count")
    for column in ("trial", "refusals (proxy)", "refusals (confirmed)", "over-refusals", "first-token KL",
                   "directions"):
        table.add_column(column, justify="right")
    for t in sorted((t for t in doc["trials"] if t["pareto"]), key=lambda t: t["kl"]):
        mark = " *" if doc["chosen"] and doc["chosen"]["trial"] == t["trial"] else ""
        table.add_row(f"{t['trial']}{mark}", f"{t['refusals_proxy']}/{n}",
                      "" if t["refusals"] is None else f"{t['refusals']}/{c}", _over(t, b), f"{t['kl']:.4f}",
                      _directions(t["params"]))
    console().print(table)
    base = doc["base"]
    over = f", borderline {_over(base, b)}" if b else ""
    log(f"search: base model refuses {base['refusals']}/{c} (proxy {base['refusals_proxy']}/{n}){over}")
    budget = doc["settings"]["kl_budget"]
    start, chosen = doc["start"], doc["chosen"]
    if start is not None:
        log(f"search: the default ablation (trial {start['trial']}): {_refusals(start, n, c)} "
            f"refusals, first-token KL {start['kl']:.4f}")
    if chosen is None:
        log(f"search: no trial kept the KL within {budget}; raise search.kl-budget")
    else:
        log(f"search: chose trial {chosen['trial']}: {_refusals(chosen, n, c)} refusals, "
            f"first-token KL {chosen['kl']:.4f} (budget {budget:.4f}, "
            f"{doc['settings']['kl_budget_from']}), {len(chosen['layers'])} layer settings")
    log(f"search: {doc['trials_run']} trials, {doc['status']}, {seconds:.0f} s -> {out}")


def _directions(params: dict) -> str:
    """Which directions a trial removes: ``attention 21.3 / mlp per-layer``."""
    def where(c: str) -> str:
        return "per-layer" if params.get(f"{c}_scope") == "per-layer" else f"{params['measurement']:.1f}"

    return " / ".join(f"{c} {where(c)}" for c in ("attention", "mlp"))


def _over(trial: dict, count: int | None) -> str:
    """Borderline validation prompts refused (confirmed trials, with a borderline set)."""
    return "" if trial.get("over_refusals") is None else f"{trial['over_refusals']}/{count}"


def _refusals(trial: dict, n: int, c: int) -> str:
    return f"{trial['refusals']}/{c}" if trial["refusals"] is not None else f"{trial['refusals_proxy']}/{n} (proxy)"


@app.command()
def main(
    model: Annotated[Path, typer.Option(help="Base model folder.")],
    directions: Annotated[Path, typer.Option(help="directions.safetensors written by reduce.")],
    harmful: Annotated[str, typer.Option(help="Harmful measurement prompts; the last --validation are used.")],
    harmless: Annotated[str, typer.Option(help="Harmless measurement prompts; the last --validation are used.")],
    out: Annotated[Path, typer.Option(help="Output search.json.")],
    plot: Annotated[Path, typer.Option(help="Output CSV, one row per trial (trial, refusals, kl, pareto, "
                                                 "confirmed, over_refusals).")],
    trials: Annotated[int, typer.Option(help="Trials to run (0: no search, nothing is loaded).")] = 0,
    borderline: Annotated[str, typer.Option(help="Borderline prompts (edgy but harmless); the last --validation judge "
                                                 "the confirmed trials' over-refusal ('' = none).")] = "",
    seed: Annotated[int, typer.Option(help="Sampler seed.")] = 0,
    scores: Annotated[Optional[Path], typer.Option(help="metrics/layers.json of score (the default ablation).")] = None,
    kl_budget: Annotated[str, typer.Option(help="Chosen trial: fewest refusals with first-token KL <= this; auto = "
                                                "the default ablation's KL.")] = "auto",
    auto_fraction: Annotated[float, typer.Option(help="ablate.auto-fraction (of the default ablation).")] = 0.5,
    measurement: Annotated[str, typer.Option(help="ablate.measurement (of the default ablation).")] = "per-layer",
    scale: Annotated[float, typer.Option(help="ablate.scale (of the default ablation).")] = 2.5,
    validation: Annotated[int, typer.Option(help="Validation prompts per set (the last N of each file).")] = 32,
    proxy_tokens: Annotated[int, typer.Option(help="Greedy tokens per harmful prompt in each trial.")] = 8,
    confirm_prompts: Annotated[int, typer.Option(help="Harmful prompts (the last N of the file) that confirm the "
                                                      "best trials.")] = 96,
    confirm_tokens: Annotated[int, typer.Option(help="Greedy tokens when confirming the best trials.")] = 12,
    confirm_top: Annotated[int, typer.Option(help="Best trials within the budget confirmed by real answers.")] = 4,
    startup_trials: Annotated[int, typer.Option(help="Random trials before TPE starts modelling.")] = 20,
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass.")] = 32,
    dtype: Annotated[str, typer.Option(help="auto (float32 on CPU, the checkpoint's on a GPU), checkpoint, float32, bfloat16, float16.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, mps.")] = "auto",
    threads: Annotated[int, typer.Option(help="CPU threads (fixed, so that CPU runs repeat exactly).")] = 2,
    norm_preserve: Annotated[str, typer.Option(help="ablate.norm-preserve (true/false).")] = "true",
    projected: Annotated[str, typer.Option(help="ablate.projected (true/false).")] = "true",
    sparsity: Annotated[float, typer.Option(help="ablate.sparsity.")] = 0.0,
    targets: Annotated[str, typer.Option(help="ablate.targets (attention and MLP writers only).")] = "attention",
    system_prompt: Annotated[str, typer.Option(help="System prompt rendered before every prompt.")] = "",
    chat_template: Annotated[str, typer.Option(help="Jinja chat template file for models without one.")] = "",
    journal_dir: Annotated[str, typer.Option(help="Folder of the resumable study journals ('' = none).")] =
        ".dvc/tmp/search",
    max_prompt_tokens: Annotated[int, typer.Option(
        help="Longest rendered prompt accepted, in tokens (the model's context also caps it).")] = 4096,
) -> None:
    """Search the layer kernels and measurement that remove the most refusals within a KL budget."""
    import time

    from abliterate.records import AblationOptions
    from abliterate.targets import parse_targets
    from abliterate.search import run_search

    options = AblationOptions(norm_preserve=parse_bool(norm_preserve, "--norm-preserve"),
                              projected=parse_bool(projected, "--projected"), sparsity=sparsity,
                              targets=parse_targets(targets))
    start = time.perf_counter()
    doc = run_search(model, directions, harmful, harmless, out, plot, borderline=borderline or None, scores=scores,
                     trials=trials, seed=seed,
                     kl_budget=kl_budget, auto_fraction=auto_fraction, measurement=measurement, scale=scale,
                     validation=validation,
                     proxy_tokens=proxy_tokens, confirm_prompts=confirm_prompts, confirm_tokens=confirm_tokens,
                     confirm_top=confirm_top, startup_trials=startup_trials, batch_size=batch_size, dtype=dtype,
                     device=device, threads=threads, options=options, system_prompt=system_prompt,
                     chat_template=chat_template, journal_dir=journal_dir, max_prompt_tokens=max_prompt_tokens,
                     report=reporter())
    if doc["status"] != "skipped":
        _report(doc, time.perf_counter() - start, out)


if __name__ == "__main__":
    run_app(app, stage="stages.search")
