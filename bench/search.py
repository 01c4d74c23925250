"""Benchmark of the search stage on a real model (the demo model by default).

Two measurements, both in one run on the same loaded model and machine:

* **speed**: a full search of ``--trials`` trials (the stage's own code, no journal), wall and CPU
  time, seconds per trial; and, as the baseline, the cost of one heretic-style trial measured here
  too (the same edit, then 100 greedy tokens for every harmful validation prompt plus the
  first-token KL), printed as a ratio. Target: 100 trials of the demo model in under 10 minutes
  on 2 CPU cores.
* **proxy agreement** (``--agreement K``): for K random points of the search space, how well each
  cheap refusal proxy predicts the verdict of a real answer (``--confirm-tokens`` greedy tokens,
  stopped once a refusal is certain): greedy answers of 4 / 8 / 12 / 16 / 24 tokens judged by the
  marker list, and the first-token probability of the tokens the base model opens its refusals
  with (> 0.5 counts as a refusal). Printed: per-prompt agreement and the mean absolute error of
  the refusal count per trial.

    python bench/search.py [--trials 100] [--agreement 0] [--threads 2] [--model models/base]
        [--directions artifacts/directions.safetensors] [--validation 32]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def settings() -> dict:
    """The pipeline's ablation options, default ablation and system prompt, from ``params.yaml``
    (what ``dvc repro search`` passes the stage)."""
    import yaml

    from abliterate.records import AblationOptions
    from abliterate.targets import parse_targets

    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    a = p["ablate"]
    options = AblationOptions(norm_preserve=bool(a["norm-preserve"]), projected=bool(a["projected"]),
                              sparsity=float(a["sparsity"]), targets=parse_targets(a["targets"]))
    return {"options": options, "auto_fraction": float(a["auto-fraction"]), "measurement": str(a["measurement"]),
            "scale": float(a["scale"]), "system_prompt": p["capture"]["system-prompt"]}


def make_study(args, journal_dir: str = ""):
    from abliterate.model.study import Study

    s = settings()
    return Study(args.model, args.directions, str(ROOT / "prompts" / "harmful.txt"),
                 str(ROOT / "prompts" / "harmless.txt"), seed=args.seed,
                 kl_budget=None if args.kl_budget == "auto" else float(args.kl_budget),
                 default={"scores": args.scores, "auto_fraction": s["auto_fraction"], "measurement": s["measurement"],
                          "scale": s["scale"]},
                 validation=args.validation, confirm_prompts=args.validation, proxy_tokens=args.proxy_tokens,
                 startup_trials=20, batch_size=args.batch_size, dtype="float32", device=args.device, threads=args.threads,
                 options=s["options"], system_prompt=s["system_prompt"], chat_template="", journal_dir=journal_dir)


def random_points(study, count: int, seed: int) -> list[dict]:
    import random

    from abliterate.search_space import ranges

    rng = random.Random(seed)
    space = ranges(study.num_layers)
    return [{k: rng.uniform(lo, hi) for k, (lo, hi) in sorted(space.items())} for _ in range(count)]


def speed(args) -> None:
    from abliterate.search import run_search

    s = settings()
    with tempfile.TemporaryDirectory() as tmp:
        load = os.getloadavg()
        start, cpu = time.perf_counter(), cpu_seconds()
        doc = run_search(args.model, args.directions, str(ROOT / "prompts" / "harmful.txt"),
                         str(ROOT / "prompts" / "harmless.txt"), Path(tmp) / "search.json", Path(tmp) / "search.csv",
                         borderline=str(ROOT / "prompts" / "borderline.txt"),
                         scores=args.scores, trials=args.trials, seed=args.seed, kl_budget=args.kl_budget,
                         validation=args.validation, options=s["options"], auto_fraction=s["auto_fraction"],
                         measurement=s["measurement"], scale=s["scale"], system_prompt=s["system_prompt"],
                         proxy_tokens=args.proxy_tokens, confirm_tokens=args.confirm_tokens, batch_size=args.batch_size,
                         device=args.device, threads=args.threads, journal_dir="")
        wall, used = time.perf_counter() - start, cpu_seconds() - cpu
    study = make_study(args)
    points = random_points(study, 3, args.seed)
    t0 = time.perf_counter()
    for p in points:
        study.score(p)
    ours = (time.perf_counter() - t0) / len(points)
    t0 = time.perf_counter()
    for p in points:  # heretic's trial: 100 greedy tokens per harmful prompt (no early stop) + first-token KL
        study.apply(p)
        study.scorer.kl()
        study.scorer.refusals(100)
    theirs = (time.perf_counter() - t0) / len(points)
    study.close()
    chosen = doc["chosen"] or {}
    print(f"search: {doc['trials_run']} trials in {wall:.0f} s wall ({wall / max(doc['trials_run'], 1):.2f} s/trial, "
          f"cpu {used:.0f} s, threads {args.threads}, load average at start {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, "
          f"{os.cpu_count()} cpus)")
    print(f"search: chose trial {chosen.get('trial')}: refusals {chosen.get('refusals')}/{doc['validation']['confirm']['count']} "
          f"(base {doc['base']['refusals']}), KL {chosen.get('kl')}")
    print(f"trial cost: ours {ours:.2f} s, heretic-style (100 tokens) {theirs:.2f} s, ratio {theirs / ours:.1f}x")
    print(f"target: 100 trials in 600 s -> {'met' if wall * 100 / max(doc['trials_run'], 1) < 600 else 'missed'} "
          f"({wall * 100 / max(doc['trials_run'], 1):.0f} s per 100 trials)")


def agreement(args) -> None:
    import torch

    study = make_study(args)
    scorer = study.scorer
    study.editor.restore()
    first = first_tokens(study)  # refusal-opening tokens of the base model
    lengths = (4, 8, 12, 16, 24)
    agree = {k: [0, 0, 0.0] for k in [*lengths, "first-token"]}
    for p in random_points(study, args.agreement, args.seed + 1):
        study.apply(p)
        truth = scorer.refusals(args.confirm_tokens, stop_early=True)
        guesses = {k: scorer.refusals(k) for k in lengths}
        probs = first_token_probability(study, first)
        guesses["first-token"] = [bool(x > 0.5) for x in probs]
        for k, guess in guesses.items():
            agree[k][0] += sum(g == t for g, t in zip(guess, truth))
            agree[k][1] += len(truth)
            agree[k][2] += abs(sum(guess) - sum(truth))
        print(f"  point: real {sum(truth)}/{len(truth)}, " +
              ", ".join(f"{k}: {sum(g)}" for k, g in guesses.items()), flush=True)
    study.close()
    print(f"proxy agreement with {args.confirm_tokens}-token answers over {args.agreement} random trials "
          f"(refusal-opening tokens of the base: {sorted(first)}):")
    for k, (same, total, err) in agree.items():
        name = f"{k} tokens + markers" if k != "first-token" else "first-token refusal probability"
        print(f"  {name:34s} per-prompt agreement {same / total:.3f}, count error {err / args.agreement:.2f}/trial")
    del torch


def first_tokens(study) -> set[int]:
    """First answer tokens of the base model's refusals on the harmful validation prompts."""
    from abliterate.refusal import refusal_openers
    from abliterate.model.generation import answer_text, greedy_generate
    from abliterate.refusal import find_refusal

    s = study.scorer
    answers = greedy_generate(s.model, s.harmful_ids, max_new_tokens=s_tokens(), eos_ids=s.eos, pad_id=s.pad,
                              batch_size=s.batch_size, device=s.device)
    return set(refusal_openers([a.ids for a in answers], [find_refusal(answer_text(s.tokenizer, a)) for a in answers]))


def s_tokens() -> int:
    return 48


def first_token_probability(study, tokens: set[int]) -> list[float]:
    import torch

    from abliterate.model.generation import answer_logprobs

    s = study.scorer
    probs = [0.0] * len(s.harmful_ids)
    index = torch.tensor(sorted(tokens), dtype=torch.long)
    for i, lp in answer_logprobs(s.model, s.harmful_ids, [[] for _ in s.harmful_ids], n_tokens=1, pad_id=s.pad,
                                 batch_size=s.batch_size, device=s.device):
        probs[i] = float(lp[0].double().exp()[index].sum()) if len(index) else 0.0
    return probs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "base")
    parser.add_argument("--directions", type=Path, default=ROOT / "artifacts" / "directions.safetensors")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--agreement", type=int, default=0, help="random trials for the proxy agreement (0: skip)")
    parser.add_argument("--validation", type=int, default=32)
    parser.add_argument("--proxy-tokens", type=int, default=8)
    parser.add_argument("--confirm-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--kl-budget", default="auto", help="nats, or auto (the default ablation's KL)")
    parser.add_argument("--scores", type=Path, default=ROOT / "metrics" / "layers.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    if args.agreement:
        agreement(args)
    if args.trials:
        speed(args)


if __name__ == "__main__":
    main()
