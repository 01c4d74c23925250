"""search: find the ablation that removes the most refusals for the least damage, automatically.

A multi-objective Optuna study (TPE, seeded) over the space of ``stages.search_space`` (a
fractional measurement index and a layer kernel for the attention and the MLP writers). Each
trial edits the loaded base model in place with the ablation engine's own code
(``stages.live_edit``: the trial's model equals the model ``dvc repro`` would write for the same
settings, bit for bit) and is scored on the validation prompts (``stages.validation``: the last
``--validation`` prompts of the measurement files, never the eval sets): refusals of short greedy
answers (``--proxy-tokens``) and the mean first-token KL against the base model. Trials whose KL
exceeds ``--kl-budget`` are infeasible for the sampler and are not answered. At the end the
``--confirm-top`` best trials within the budget are confirmed with real answers (``--confirm-tokens``)
to more harmful prompts (``--confirm-prompts``, the last ones of the file, the validation ones among
them); the chosen trial has the fewest confirmed refusals (then the lowest KL). The first trial is
the default ablation (what ``plan`` does with ``layers: auto``, ``measurement: auto`` and scale 1,
read from ``--scores``; ``ablate.scale`` is left out, so that trying scales never reruns a search);
``--kl-budget auto`` makes its KL the budget, so the chosen trial refuses least among the trials
that do no more damage than the default, and is the default itself if none beats it.

Outputs: ``search.json`` (the chosen trial's per-layer settings, which ``plan --layers search``
turns into edits, the Pareto front and every trial) and a CSV with one row per trial. With
``--trials 0`` (the default) nothing is loaded: ``search.json`` just says that no search ran.
The study journal (``--journal-dir``, outside the DVC outputs) is keyed by a hash of everything
that decides a trial's numbers, so running again with more trials continues the same study, and
Ctrl-C stops cleanly: the best trial so far is written, marked ``interrupted``. A continued study
draws its later trials from a freshly seeded sampler, so they differ from an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.cliutil import console, fail, new_app, parse_bool, run_app

app = new_app(__doc__.split("\n")[0])
FORMAT = 1
HOW = "set search.trials, e.g. `dvc exp run -S search.trials=100 -S ablate.layers=search`"


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


def write_outputs(doc: dict, out: Path, plot: Path) -> None:
    """``search.json`` and the per-trial CSV (trial, refusals, kl, pareto), both atomically."""
    from stages.atomic import write_json, write_text

    lines = ["trial,refusals,kl,pareto,confirmed"]
    for t in doc.get("trials", []):
        proxy = "" if t["refusals_proxy"] is None else str(t["refusals_proxy"])  # not answered: KL far too high
        confirmed = "" if t["refusals"] is None else str(t["refusals"])
        lines.append(f"{t['trial']},{proxy},{t['kl']!r},{int(t['pareto'])},{confirmed}")
    write_text(plot, "\n".join(lines) + "\n")
    write_json(out, doc)


def run_search(model_dir: Path, directions: Path, harmful: str, harmless: str, out: Path, plot: Path, *,
               scores: Path | None = None, trials: int = 0, seed: int = 0, kl_budget: float | str = "auto",
               validation: int = 32, proxy_tokens: int = 8, confirm_prompts: int = 96, confirm_tokens: int = 12,
               confirm_top: int = 4, startup_trials: int = 20, batch_size: int = 32,
               dtype: str = "float32", device: str = "auto", threads: int = 2, norm_preserve: bool = True,
               projected: bool = True, sparsity: float = 0.0, targets: str = "attention,mlp,experts,shared-experts",
               auto_fraction: float = 0.5, system_prompt: str = "", chat_template: str = "",
               journal_dir: str = ".dvc/tmp/search") -> dict:
    """Run the study (or record that none ran) and write ``out`` and ``plot``; return the document.

    ``scores`` (score's ``metrics/layers.json``) and ``auto_fraction`` give the default ablation
    (scale 1), the first trial; without ``scores`` there is none and ``kl_budget`` must be a number."""
    budget = parse_budget(kl_budget)
    _check(trials, validation, proxy_tokens, confirm_prompts, confirm_tokens, confirm_top, batch_size, threads)
    if trials == 0:
        doc = {"format": FORMAT, "status": "skipped", "reason": "search.trials is 0", "how": HOW, "trials": []}
        write_outputs(doc, out, plot)
        console().print("search: search.trials is 0, no search ran (ablate.layers search needs one)")
        return doc
    if budget is None and scores is None:
        fail("search.kl-budget auto measures the default ablation, which needs the layer scores (--scores)")
    from stages.plan import parse_targets
    from stages.search_space import SEARCHABLE

    roles = parse_targets(targets)
    if not 0.0 <= sparsity < 1.0:
        fail(f"ablate.sparsity must be in [0, 1), got {sparsity}")
    extra = [r for r in roles if r not in SEARCHABLE]
    if extra:
        fail(f"the search tunes attention and MLP writers only, but ablate.targets has {extra[0]}; "
             "drop it from ablate.targets or leave search.trials at 0")
    from stages.search_run import Study

    study = Study(model_dir, directions, harmful, harmless, seed=seed, kl_budget=budget,
                  default={"scores": scores, "auto_fraction": auto_fraction}, validation=validation,
                  confirm_prompts=confirm_prompts,
                  proxy_tokens=proxy_tokens, startup_trials=startup_trials, batch_size=batch_size, dtype=dtype,
                  device=device, threads=threads, options={"norm_preserve": norm_preserve, "projected": projected,
                                                           "targets": list(roles)}, sparsity=sparsity,
                  system_prompt=system_prompt, chat_template=chat_template, journal_dir=journal_dir)
    start = time.perf_counter()
    interrupted = study.optimize(trials)
    confirmed, interrupted = study.confirm(confirm_tokens, confirm_top, interrupted)
    doc = study.document(trials, confirmed, interrupted, confirm_tokens, confirm_top, format_=FORMAT)
    write_outputs(doc, out, plot)
    study.close()
    study.report(doc, time.perf_counter() - start, out)
    return doc


def chosen_layer_edits(path: Path | None, directions: Path, num_layers: int, *, norm_preserve: bool, projected: bool,
                       sparsity: float, targets) -> dict:
    """The chosen trial of ``search.json`` as plan's per-layer settings; clear errors if unusable.

    Returns ``{"edits": [LayerEdit], "measurement": m, "source": {...}}``.
    """
    from stages.plan import LayerEdit
    from stages.prompts import file_hash

    if path is None or not Path(path).is_file():
        fail(f"ablate.layers is search but the search result {path} does not exist; {HOW}")
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        fail(f"{path} is not valid JSON ({exc}); rerun `dvc repro search`")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        fail(f"{path} is not a search result of format {FORMAT}; rerun `dvc repro search`")
    if doc.get("status") == "skipped":
        fail(f"ablate.layers is search, but no search ran (search.trials is 0); {HOW}")
    chosen = doc.get("chosen")
    if not chosen:
        fail(f"no trial in {path} kept the first-token KL within search.kl-budget ({doc['settings']['kl_budget']}); "
             "raise search.kl-budget or run more trials")
    if doc["inputs"]["num_layers"] != num_layers or doc["inputs"]["directions_sha256"] != file_hash(directions):
        fail(f"{path} was searched on other directions or another model; rerun `dvc repro search`")
    mine = {"norm_preserve": norm_preserve, "projected": projected, "sparsity": float(sparsity),
            "targets": list(targets)}
    for key, value in mine.items():
        if doc["options"][key] != value:
            fail(f"{path} was searched with {key.replace('_', '-')} {doc['options'][key]} but ablate asks for "
                 f"{value}; rerun `dvc repro search` (or restore the setting)")
    edits = [LayerEdit(int(e["layer"]), e["measurement"], float(e["scale"]), float(e["sparsity"]),
                       tuple(e["roles"])) for e in chosen["layers"]]
    source = {"file": str(path), "trial": chosen["trial"], "status": doc["status"], "refusals": chosen["refusals"],
              "validation_prompts": doc["validation"]["harmful"]["count"], "kl": chosen["kl"]}
    return {"edits": edits, "measurement": chosen["measurement"], "source": source}


@app.command()
def main(
    model: Annotated[Path, typer.Option(help="Base model folder.")],
    directions: Annotated[Path, typer.Option(help="directions.safetensors written by reduce.")],
    harmful: Annotated[str, typer.Option(help="Harmful measurement prompts; the last --validation are used.")],
    harmless: Annotated[str, typer.Option(help="Harmless measurement prompts; the last --validation are used.")],
    out: Annotated[Path, typer.Option(help="Output search.json.")],
    plot: Annotated[Path, typer.Option(help="Output CSV, one row per trial (trial, refusals, kl, pareto).")],
    trials: Annotated[int, typer.Option(help="Trials to run (0: no search, nothing is loaded).")] = 0,
    seed: Annotated[int, typer.Option(help="Sampler seed.")] = 0,
    scores: Annotated[Optional[Path], typer.Option(help="metrics/layers.json of score (the default ablation).")] = None,
    kl_budget: Annotated[str, typer.Option(help="Chosen trial: fewest refusals with first-token KL <= this; auto = "
                                                "the default ablation's KL.")] = "auto",
    auto_fraction: Annotated[float, typer.Option(help="ablate.auto-fraction (of the default ablation).")] = 0.5,
    validation: Annotated[int, typer.Option(help="Validation prompts per set (the last N of each file).")] = 32,
    proxy_tokens: Annotated[int, typer.Option(help="Greedy tokens per harmful prompt in each trial.")] = 8,
    confirm_prompts: Annotated[int, typer.Option(help="Harmful prompts (the last N of the file) that confirm the "
                                                      "best trials.")] = 96,
    confirm_tokens: Annotated[int, typer.Option(help="Greedy tokens when confirming the best trials.")] = 12,
    confirm_top: Annotated[int, typer.Option(help="Best trials within the budget confirmed by real answers.")] = 4,
    startup_trials: Annotated[int, typer.Option(help="Random trials before TPE starts modelling.")] = 20,
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass.")] = 32,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto.")] = "float32",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, mps.")] = "auto",
    threads: Annotated[int, typer.Option(help="CPU threads (fixed, so that CPU runs repeat exactly).")] = 2,
    norm_preserve: Annotated[str, typer.Option(help="ablate.norm-preserve (true/false).")] = "true",
    projected: Annotated[str, typer.Option(help="ablate.projected (true/false).")] = "true",
    sparsity: Annotated[float, typer.Option(help="ablate.sparsity.")] = 0.0,
    targets: Annotated[str, typer.Option(help="ablate.targets (attention and MLP writers only).")] =
        "attention,mlp,experts,shared-experts",
    system_prompt: Annotated[str, typer.Option(help="System prompt rendered before every prompt.")] = "",
    chat_template: Annotated[str, typer.Option(help="Jinja chat template file for models without one.")] = "",
    journal_dir: Annotated[str, typer.Option(help="Folder of the resumable study journals ('' = none).")] =
        ".dvc/tmp/search",
) -> None:
    """Search the layer kernels and measurement that remove the most refusals within a KL budget."""
    run_search(model, directions, harmful, harmless, out, plot, scores=scores, trials=trials, seed=seed,
               kl_budget=kl_budget, auto_fraction=auto_fraction,
               validation=validation, proxy_tokens=proxy_tokens, confirm_prompts=confirm_prompts,
               confirm_tokens=confirm_tokens,
               confirm_top=confirm_top, startup_trials=startup_trials, batch_size=batch_size, dtype=dtype,
               device=device, threads=threads, norm_preserve=parse_bool(norm_preserve, "--norm-preserve"),
               projected=parse_bool(projected, "--projected"), sparsity=sparsity, targets=targets,
               system_prompt=system_prompt, chat_template=chat_template, journal_dir=journal_dir)


if __name__ == "__main__":
    run_app(app)
