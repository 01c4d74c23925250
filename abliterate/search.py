"""The automatic search: find the ablation that removes the most refusals for the least damage.

A multi-objective Optuna study (TPE, seeded) over the space of :mod:`abliterate.search_space` (a
fractional measurement index and a layer kernel for the attention and the MLP writers). Each
trial edits the loaded base model in place with the ablation engine's own code
(:mod:`abliterate.model.live_edit`: the trial's model equals the model ``dvc repro`` would write
for the same settings, bit for bit) and is scored on the validation prompts
(:mod:`abliterate.model.validation`: the last ``validation`` prompts of the measurement files, never
the eval sets): refusals of short greedy answers (``proxy_tokens``) and the mean first-token KL
against the base model. Trials whose KL exceeds the KL budget are infeasible for the sampler and
are not answered. At the end the ``confirm_top`` best trials within the budget are confirmed with
real answers (``confirm_tokens``) to more harmful prompts (``confirm_prompts``, the last ones of
the file, the validation ones among them), and to the last ``validation`` borderline prompts (edgy
but harmless; ``borderline``, optional): the chosen trial has the fewest confirmed refusals, then
refuses the fewest borderline prompts, then has the lowest KL. The first trial is the default
ablation (what ``plan`` does with ``layers: auto`` and the pipeline's measurement and scale, read
from the layer scores); ``kl_budget`` ``auto`` makes its KL the budget, so the chosen trial refuses
least among the trials that do no more damage than the default, and is the default itself if none
beats it.

The study journal (``journal_dir``, outside the DVC outputs) is keyed by a hash of everything
that decides a trial's numbers, so running again with more trials continues the same study, and
Ctrl-C stops cleanly: the best trial so far is written, marked ``interrupted``. A continued study
draws its later trials from a freshly seeded sampler, so they differ from an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

from abliterate.records import AblationOptions
from abliterate.errors import fail
from abliterate.progress import PLAIN, Reporter


def parse_budget(value: str | float) -> float | None:
    """``search.kl-budget``: a number of nats above 0, or ``auto`` (None: the default ablation's KL)."""
    if str(value).strip().lower() == "auto":
        return None
    try:
        budget = float(value)
    except (TypeError, ValueError):
        fail(f"search.kl-budget must be auto or a number of nats above 0, got {value!r}")
    if not budget > 0:
        fail(f"search.kl-budget must be auto or a number of nats above 0, got {value!r}")
    return budget


def _check(trials: int, validation: int, proxy_tokens: int, confirm_prompts: int, confirm_tokens: int,
           confirm_top: int, batch_size: int, threads: int) -> None:
    checks = ((trials >= 0, f"search.trials must be 0 or more, got {trials}"),
              (validation >= 1, f"search.validation must be at least 1, got {validation}"),
              (confirm_prompts >= 1, f"search.confirm-prompts must be at least 1, got {confirm_prompts}"),
              (1 <= proxy_tokens <= 512, f"search.proxy-tokens must be 1-512, got {proxy_tokens}"),
              (1 <= confirm_tokens <= 8192, f"search.confirm-tokens must be 1-8192, got {confirm_tokens}"),
              (confirm_top >= 1, f"search.confirm-top must be at least 1, got {confirm_top}"),
              (batch_size >= 1, f"search.batch-size must be at least 1, got {batch_size}"),
              (threads >= 1, f"search.threads must be at least 1, got {threads}"))
    for ok, message in checks:
        if not ok:
            fail(message)


def run_search(model_dir: Path, directions: Path, harmful: str, harmless: str, out: Path, plot: Path, *,
               borderline: str | None = None, scores: Path | None = None, trials: int = 0, seed: int = 0,
               kl_budget: float | str = "auto",
               validation: int = 32, proxy_tokens: int = 8, confirm_prompts: int = 96, confirm_tokens: int = 12,
               confirm_top: int = 4, startup_trials: int = 20, batch_size: int = 32,
               dtype: str = "auto", device: str = "auto", threads: int = 2,
               options: AblationOptions = AblationOptions(), auto_fraction: float = 0.5,
               measurement: str = "per-layer", scale: float = 2.5, system_prompt: str = "",
               chat_template: str = "", journal_dir: str = ".dvc/tmp/search", max_prompt_tokens: int = 4096,
               report: Reporter = PLAIN) -> dict:
    """Run the study (or record that none ran) and write ``out`` and ``plot``; return the document.

    ``scores`` (score's ``metrics/layers.json``), ``auto_fraction``, ``measurement`` and ``scale``
    give the default ablation (``layers: auto``), the first trial; without ``scores`` there is none
    and ``kl_budget`` must be a number."""
    from abliterate.formats.search_result import FORMAT, skipped, write_search

    budget = parse_budget(kl_budget)
    _check(trials, validation, proxy_tokens, confirm_prompts, confirm_tokens, confirm_top, batch_size, threads)
    if trials == 0:
        doc = skipped("search.trials is 0")
        write_search(doc, out, plot)
        report.message("search: search.trials is 0, no search ran (ablate.layers search needs one)")
        return doc
    if budget is None and scores is None:
        fail("search.kl-budget auto measures the default ablation, which needs the layer scores (--scores)")
    from abliterate.search_space import SEARCHABLE

    if not 0.0 <= options.sparsity < 1.0:
        fail(f"ablate.sparsity must be in [0, 1), got {options.sparsity}")
    from abliterate.layers import check_scale

    check_scale(scale, "ablate.scale")
    extra = [r for r in options.targets if r not in SEARCHABLE]
    if extra:
        fail(f"the search tunes attention and MLP writers only, but ablate.targets has {extra[0]}; "
             "drop it from ablate.targets or leave search.trials at 0")
    from abliterate.model.study import Study

    study = Study(model_dir, directions, harmful, harmless, seed=seed, kl_budget=budget, borderline=borderline,
                  default={"scores": scores, "auto_fraction": auto_fraction, "measurement": measurement,
                           "scale": scale}, validation=validation,
                  confirm_prompts=confirm_prompts, proxy_tokens=proxy_tokens, startup_trials=startup_trials,
                  batch_size=batch_size, dtype=dtype, device=device, threads=threads, options=options,
                  system_prompt=system_prompt, chat_template=chat_template, journal_dir=journal_dir,
                  max_prompt_tokens=max_prompt_tokens, report=report)
    interrupted = study.optimize(trials)
    confirmed, interrupted = study.confirm(confirm_tokens, confirm_top, interrupted)
    doc = study.document(trials, confirmed, interrupted, confirm_tokens, confirm_top, format_=FORMAT)
    write_search(doc, out, plot)
    study.close()
    return doc
