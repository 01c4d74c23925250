"""Benchmark against heretic: both tools on the same base model, same prompts, same wall time.

Run in a workspace where ``dvc repro`` has run (``models/base``, ``artifacts/baseline.parquet``,
``artifacts/model`` and ``metrics/eval.json`` of the default ablation). Heretic (heretic-llm 1.4.0,
AGPL) is never imported: it runs as a separate program from its own virtual environment, whose
folder ``HERETIC_VENV`` names (``$HERETIC_VENV/bin/heretic``); without it the benchmark says so in
one line and exits 0. Steps, all timed in this run:

1. **ours**: ``capture`` (both sets), ``reduce``, ``score`` and ``search`` (``--trials``) as the
   pipeline runs them with ``params.yaml``, into ``--work``. Their total wall time is the budget.
2. **heretic**: the same base model, its directions from the same measurement prompts (all but the
   last ``search.validation`` lines of ``prompts/harmful.txt`` / ``prompts/harmless.txt``) and its
   trials scored on those last lines (our search's validation prompts), the system prompt our
   pipeline renders, ``--heretic-tokens`` tokens per refusal check, seed 0. Equal time: it runs with
   far more trials than it can finish and gets Ctrl+C (SIGINT, which it handles by ending the study
   after the running trial) once the budget is spent; its own model loading and direction
   measurement count inside the budget, as ours do. Its Pareto front is then read from its trial
   menu and up to ``--heretic-front`` points are saved through that menu.
3. Every point is judged by our ``evaluate`` on ``prompts/eval/`` against the same baseline: the
   base model; our default (``metrics/eval.json``) and the same ablation at the ``--scales``
   given (``-S ablate.scale=...``); our search's chosen trial; heretic's saved points and, for
   each of them, the two points of our search's front with the fewest validation refusals at no
   more validation KL than heretic measured for it (both tools score their trials on the same
   validation prompts), planned with ``ablate.layers: search:N`` as ``dvc exp run`` writes them.
   Each tool's *chosen* point is its fewest-refusal point whose first-token KL is at most our
   default's.

Prints one table (refusals, over-refusal, first-token KL, answer KL, wall time), says for every
heretic point which of ours dominates it (fewer or equal refusals, KL and over-refusal, one of them
strictly fewer), and writes ``plots/peers.csv`` (every evaluated point of both tools) and
``plots/peers-<label>.svg`` (the two fronts, refusals against first-token KL).

    HERETIC_VENV=/path/to/venv python bench/peers.py [--trials 100] [--heretic-front 4] [--resume]
        [--work /tmp/abliterate-peers] [--label demo] [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MENU_LINE = re.compile(r"^\[(\d+)\] \[Trial\s+(\d+)\] Refusals:\s*(\d+)/(\d+), KL divergence: ([0-9.]+)", re.M)


def params() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "params.yaml").read_text())


def timed(command: list[str], log: Path) -> float:
    """Run one of our stage commands (output to ``log``); its wall time in seconds."""
    start = time.perf_counter()
    with open(log, "a") as out:
        result = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode:
        sys.exit(f"peers: {' '.join(command[:1])} failed; see {log}")
    return time.perf_counter() - start


def run_ours(p: dict, work: Path, trials: int, log: Path) -> float:
    """capture, reduce, score and search into ``work``; their total wall time."""
    c, s, a = p["capture"], p["search"], p["ablate"]
    shared = ["--system-prompt", c["system-prompt"], "--chat-template", c["chat-template"]]
    seconds = 0.0
    for name in ("harmful", "harmless"):
        seconds += timed(["stages.capture", "--model", "models/base", "--prompts", f"prompts/{name}.txt",
                          "--out", str(work / f"{name}.parquet"), "--batch-size", str(c["batch-size"]),
                          "--dtype", c["dtype"], "--device", c["device"], "--positions", str(c["positions"]),
                          *shared], log)
    seconds += timed(["stages.reduce", "--harmful", str(work / "harmful.parquet"), "--harmless",
                      str(work / "harmless.parquet"), "--out", str(work / "directions.safetensors"),
                      "--winsorize", str(p["reduce"]["winsorize"]),
                      "--orthogonalize", str(p["reduce"]["orthogonalize"]).lower()], log)
    seconds += timed(["stages.score", "--directions", str(work / "directions.safetensors"), "--metrics",
                      str(work / "layers.json"), "--plot", str(work / "layers.csv"),
                      "--min-depth", str(p["score"]["min-depth"]), "--max-depth", str(p["score"]["max-depth"])], log)
    options = ["--norm-preserve", str(a["norm-preserve"]).lower(), "--projected", str(a["projected"]).lower(),
               "--sparsity", str(a["sparsity"]), "--targets", a["targets"], "--auto-fraction", str(a["auto-fraction"]),
               "--measurement", str(a["measurement"]), "--scale", str(a["scale"])]
    search: list[str] = []
    for key in ("seed", "kl-budget", "validation", "proxy-tokens", "confirm-prompts", "confirm-tokens",
                "confirm-top", "startup-trials", "batch-size", "dtype", "device", "threads"):
        search += [f"--{key}", str(s[key])]
    seconds += timed(["stages.search", "--model", "models/base", "--directions", str(work / "directions.safetensors"),
                      "--harmful", "prompts/harmful.txt", "--harmless", "prompts/harmless.txt",
                      "--borderline", "prompts/borderline.txt", "--out", str(work / "search.json"), "--plot", str(work / "search.csv"),
                      "--scores", str(work / "layers.json"), "--trials", str(trials), *search, *options, *shared,
                      "--journal-dir", str(work / "journal")], log)
    return seconds


def write_point(p: dict, work: Path, trial: int | None, out: Path, scale: float | None = None) -> Path:
    """Plan trial ``trial`` of our search (``ablate.layers: search:N``), or with ``trial`` None the
    configured ablation at ``scale``, and write the ablated folder."""
    import yaml

    from abliterate.formats.plans import load_shard_plan
    from abliterate.planning import plan
    from abliterate.records import AblationOptions
    from abliterate.shard_edit import ablate_shard
    from abliterate.targets import parse_targets

    a = p["ablate"]
    options = AblationOptions(norm_preserve=bool(a["norm-preserve"]), projected=bool(a["projected"]),
                              sparsity=float(a["sparsity"]), targets=parse_targets(a["targets"]))
    plan(ROOT / "models" / "base", ROOT / "model.yaml", work / "directions.safetensors", work / "layers.json",
         out / "plan", layers=str(a["layers"]) if trial is None else f"search:{trial}",
         measurement=str(a["measurement"]), scale=float(a["scale"] if scale is None else scale),
         options=options, auto_fraction=float(a["auto-fraction"]), search=work / "search.json")
    model = out / "model"
    model.mkdir(parents=True, exist_ok=True)
    table = yaml.safe_load((ROOT / "model.yaml").read_text())
    for key, name in table["shards"].items():
        ablate_shard(ROOT / "models" / "base" / name, load_shard_plan(out / "plan" / f"{key}.json"), model / name)
    for name in table["files"].values():
        shutil.copy(ROOT / "models" / "base" / name, model / name)
    return model


def judged(p: dict, out: Path, log: Path, make_model) -> dict:
    """Our ``evaluate`` of the folder ``make_model()`` writes, kept in ``out/eval.json`` (reused when
    there: ``--resume``); ``make_model`` returns the folder and whether to delete it afterwards."""
    metrics = out / "eval.json"
    if not metrics.is_file():
        print(f"peers: evaluating {out.parent.name}/{out.name} ...", flush=True)
        model, scratch = make_model()
        e = p["evaluate"]
        timed(["stages.evaluate", "--model", str(model), "--baseline", "artifacts/baseline.parquet",
               "--metrics", str(metrics), "--report", str(out / "eval.md"), "--batch-size", str(e["batch-size"]),
               "--dtype", e["dtype"], "--device", e["device"]], log)
        if scratch:
            shutil.rmtree(model)
    return json.loads(metrics.read_text())


def system_prompt(p: dict) -> str:
    """The system prompt our pipeline renders: the configured one, else the chat template's default
    (heretic always sends one; an empty one would change what the model sees)."""
    if p["capture"]["system-prompt"]:
        return p["capture"]["system-prompt"]
    from abliterate.model.modelio import load_tokenizer

    tokenizer = load_tokenizer(ROOT / "models" / "base")
    marker = "\x00SYSTEM\x00"
    user = [{"role": "user", "content": "Q"}]
    plain = tokenizer.apply_chat_template(user, tokenize=False)
    marked = tokenizer.apply_chat_template([{"role": "system", "content": marker}, *user], tokenize=False)
    head, _, tail = marked.partition(marker)
    if not (plain.startswith(head) and plain.endswith(tail) and len(plain) >= len(head) + len(tail)):
        sys.exit("peers: the chat template renders no default system prompt, and heretic always sends one; "
                 "set capture.system-prompt in params.yaml (and dvc repro) to compare like with like")
    return plain[len(head):len(plain) - len(tail)]


class Heretic:
    """heretic run as a separate program, driven through its numbered menus (batch mode)."""

    def __init__(self, venv: Path, work: Path, log: Path):
        self.venv, self.work, self.log = venv, work, log
        self.buffer = ""
        self.lock = threading.Lock()

    def start(self, config: str) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "config.toml").write_text(config)
        env = {**os.environ, "KAGGLE_KERNEL_RUN_TYPE": "Batch", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        # a job started in the background of a script inherits SIGINT ignored; heretic must see Ctrl+C
        self.process = subprocess.Popen([str(self.venv / "bin" / "heretic")], cwd=self.work, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        with open(self.log, "ab") as log:
            while chunk := os.read(self.process.stdout.fileno(), 65536):
                log.write(chunk)
                log.flush()
                with self.lock:
                    self.buffer += chunk.decode("utf-8", "replace")

    def expect(self, text: str, since: int, timeout: float = 3600) -> int:
        """Wait until ``text`` appears after offset ``since`` of the output; the offset after it."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                at = self.buffer.find(text, since)
            if at >= 0:
                return at + len(text)
            if self.process.poll() is not None:
                time.sleep(0.5)
                with self.lock:
                    at = self.buffer.find(text, since)
                if at < 0:
                    sys.exit(f"peers: heretic ended (exit {self.process.returncode}) before {text!r}; see {self.log}")
            time.sleep(0.2)
        sys.exit(f"peers: heretic printed no {text!r} within {timeout:.0f} s; see {self.log}")

    def send(self, line: str) -> None:
        self.process.stdin.write((line + "\n").encode())
        self.process.stdin.flush()

    def stop_after(self, seconds: float) -> None:
        """Ctrl+C once the budget is spent (and one trial is done): heretic ends its study there."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and self.process.poll() is None:
            time.sleep(0.5)
        while "Elapsed time" not in self.buffer and self.process.poll() is None:
            time.sleep(0.5)  # interrupted before its first trial ends, heretic stops without a menu
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)

    def front(self) -> tuple[list[dict], int, int]:
        """The trial menu's Pareto front (fewest refusals first), the output offset after it and the
        menu number of "Exit program"."""
        at = self.expect("Which trial do you want to use?", 0)
        at = self.expect("Enter number:", at)
        with self.lock:
            menu = self.buffer[:at]
        menu = menu[menu.rfind("Which trial do you want to use?"):]
        points = [{"choice": int(m[1]), "trial": int(m[2]), "refusals": int(m[3]), "prompts": int(m[4]),
                   "kl": float(m[5])} for m in MENU_LINE.finditer(menu)]
        exit_choice = max((int(n) for n in re.findall(r"^\[(\d+)\] Exit program", menu, re.M)), default=0)
        if not points or not exit_choice:
            sys.exit(f"peers: could not read heretic's trial menu; see {self.log}")
        return points, at, exit_choice

    def save(self, choice: int, folder: Path, since: int) -> int:
        self.send(str(choice))
        at = self.expect("What do you want to do with the decensored model?", since)
        at = self.expect("Enter number:", at)
        self.send("1")  # Save the model to a local folder
        at = self.expect("Path to the folder", at)
        self.send(str(folder))
        at = self.expect("Model saved to", at)
        at = self.expect("Enter number:", at)
        self.send("5")  # Return to the trial selection menu
        at = self.expect("Which trial do you want to use?", at)
        return self.expect("Enter number:", at)

    def finish(self, exit_choice: int) -> None:
        self.send(str(exit_choice))
        self.process.stdin.close()
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()


def heretic_config(p: dict, work: Path, tokens: int, startup: int, system: str) -> str:
    """config.toml: the same model, prompts (directions vs. trial scoring split as our search's) and system prompt."""
    validation = int(p["search"]["validation"])
    files = {}
    for name in ("harmful", "harmless"):
        lines = [x for x in (ROOT / "prompts" / f"{name}.txt").read_text().splitlines() if x.strip()]
        files[name] = (lines[:-validation], lines[-validation:])
        (work / f"{name}-directions.txt").write_text("\n".join(files[name][0]) + "\n")
        (work / f"{name}-validation.txt").write_text("\n".join(files[name][1]) + "\n")
    return "\n".join([
        f"model = {json.dumps(str(ROOT / 'models' / 'base'))}",
        'dtypes = ["float32"]', 'device_map = "cpu"', f"batch_size = {int(p['search']['batch-size'])}",
        f"max_response_length = {tokens}", "n_trials = 10000", f"n_startup_trials = {startup}", "seed = 0",
        f"system_prompt = {json.dumps(system)}", 'export_strategy = "merge"', "",
        "[bad_prompts]", f"dataset = {json.dumps(str(work / 'harmful-directions.txt'))}", "",
        "[good_prompts]", f"dataset = {json.dumps(str(work / 'harmless-directions.txt'))}", "",
        "[bad_evaluation_prompts]", f"dataset = {json.dumps(str(work / 'harmful-validation.txt'))}", "",
        "[good_evaluation_prompts]", f"dataset = {json.dumps(str(work / 'harmless-validation.txt'))}", ""])


def spread(items: list, count: int) -> list:
    """``count`` items evenly spaced over ``items`` (its ends included)."""
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)] if count > 1 else items[:1]


def row(tool: str, name: str, m: dict, own: str = "", when: str = "after") -> dict:
    """One evaluated point; ``when="before"``: the base model of the same metrics (no KL)."""
    kl = when == "after"
    return {"tool": tool, "point": name, "refusals": m[f"refusal_rate_{when}"],
            "over_refusal": m[f"over_refusal_rate_{when}"], "kl_first_token": m["kl_first_token"] if kl else 0.0,
            "kl_answer": m["kl_answer"] if kl else 0.0, "own": own}


def dominates(o: dict, h: dict) -> bool:
    keys = ("refusals", "kl_first_token", "over_refusal")
    return all(o[k] <= h[k] for k in keys) and any(o[k] < h[k] for k in keys)


def chosen(points: list[dict], budget: float) -> dict | None:
    inside = [r for r in points if r["kl_first_token"] <= budget]
    return min(inside, key=lambda r: (r["refusals"], r["kl_first_token"]), default=None)


def write_csv(rows: list[dict], path: Path, label: str) -> None:
    """Rows of this ``label`` replace its earlier ones; other models' rows are kept. Written with the
    csv module, so that a point name holding a comma ("default, scale 2") stays one quoted field."""
    import csv
    import io

    keep: list[list[str]] = []
    if path.exists():
        with path.open(newline="") as f:
            keep = [row for row in list(csv.reader(f))[1:] if row and row[0] != label]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["model", "tool", "point", "refusals", "over_refusal", "kl_first_token", "kl_answer", "chosen"])
    writer.writerows(keep)
    for r in rows:
        writer.writerow([label, r["tool"], r["point"], f"{r['refusals']:.4f}", f"{r['over_refusal']:.4f}",
                         f"{r['kl_first_token']:.4f}", f"{r['kl_answer']:.4f}", int(r.get("chosen", False))])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(out.getvalue())


def write_svg(rows: list[dict], path: Path, label: str) -> None:
    """Refusals against first-token KL, one colour per tool, each tool's front drawn as a line."""
    from abliterate.search_space import pareto_front

    width, height, pad = 520, 360, 50
    kl_max = max(r["kl_first_token"] for r in rows) * 1.1 or 1.0
    x = lambda kl: pad + (width - 2 * pad) * kl / kl_max  # noqa: E731
    y = lambda rate: height - pad - (height - 2 * pad) * rate  # noqa: E731
    colours = {"ours": "#1f77b4", "heretic": "#d62728", "base": "#555555"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{width / 2}" y="20" text-anchor="middle">{label}: refusals vs first-token KL (plain prompts)</text>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">KL, first answer token (nats)</text>',
             f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">'
             'refusal rate (harmful)</text>']
    for i in range(5):
        kl, rate = kl_max * i / 4, i / 4
        parts.append(f'<text x="{x(kl)}" y="{height - pad + 15}" text-anchor="middle">{kl:.2f}</text>')
        parts.append(f'<text x="{pad - 5}" y="{y(rate) + 4}" text-anchor="end">{rate:.0%}</text>')
    for tool, colour in colours.items():
        mine = sorted((r for r in rows if r["tool"] == tool), key=lambda r: (r["kl_first_token"], r["refusals"]))
        keys = pareto_front({i: (r["refusals"], r["kl_first_token"]) for i, r in enumerate(mine)})
        front = sorted((mine[i] for i in keys), key=lambda r: r["kl_first_token"])
        if len(front) > 1:  # the tool's front among its evaluated points: KL up, refusals down
            line = " ".join(f"{x(r['kl_first_token']):.1f},{y(r['refusals']):.1f}" for r in front)
            parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-opacity="0.5"/>')
        for r in mine:
            parts.append(f'<circle cx="{x(r["kl_first_token"]):.1f}" cy="{y(r["refusals"]):.1f}" r="{6 if r.get("chosen") else 4}" '
                         f'fill="{colour}"><title>{tool} {r["point"]}</title></circle>')
    for i, (tool, colour) in enumerate(colours.items()):
        parts.append(f'<circle cx="{width - pad - 60}" cy="{pad + 15 * i}" r="4" fill="{colour}"/>'
                     f'<text x="{width - pad - 50}" y="{pad + 15 * i + 4}">{tool}</text>')
    path.write_text("\n".join(parts + ["</svg>"]) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=100, help="our search's trials")
    parser.add_argument("--heretic-front", type=int, default=4, help="points of heretic's front saved and evaluated")
    parser.add_argument("--heretic-tokens", type=int, default=16, help="tokens per refusal check in heretic's trials")
    parser.add_argument("--heretic-startup", type=int, default=10, help="heretic's random trials before its TPE model")
    parser.add_argument("--budget", type=float, default=0.0, help="heretic's wall time in seconds (0: ours)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/abliterate-peers"))
    parser.add_argument("--label", default="demo", help="the model's name in plots/peers.csv")
    parser.add_argument("--scales", type=lambda t: [float(x) for x in t.split(",") if x], default=[1.0, 1.5],
                        help="other ablate.scale values of the default ablation evaluated too (comma list)")
    parser.add_argument("--matches", type=int, default=2, help="points of our front evaluated per heretic point")
    parser.add_argument("--resume", action="store_true", help="reuse the phases already in --work (run on the same base model: points still missing are judged on the workspace's)")
    parser.add_argument("--report-only", action="store_true", help="print the table again from --work/points.json")
    args = parser.parse_args()
    if args.report_only:
        report(json.loads((args.work / "points.json").read_text()))
        return

    venv = os.environ.get("HERETIC_VENV", "")
    if not venv or not (Path(venv) / "bin" / "heretic").is_file():
        print("peers: skipped: set HERETIC_VENV to a virtual environment holding heretic-llm 1.4.0 (bin/heretic)")
        return
    for needed in ("models/base", "artifacts/baseline.parquet", "metrics/eval.json", "model.yaml"):
        if not (ROOT / needed).exists():
            sys.exit(f"peers: {needed} is missing; run `dvc repro` first")
    p = params()
    work = args.work.resolve()
    log = work / "ours.log"
    done = work / "ours.json"
    if args.resume and done.is_file() and json.loads(done.read_text())["trials"] == args.trials:
        ours_seconds = json.loads(done.read_text())["seconds"]
        print(f"peers: our measurement and search from {work} ({ours_seconds:.0f} s)", flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        print(f"peers: our measurement and {args.trials}-trial search ...", flush=True)
        ours_seconds = run_ours(p, work, args.trials, log)
        done.write_text(json.dumps({"seconds": ours_seconds, "trials": args.trials}) + "\n")
        # the default's numbers belong to this run's model: --resume must not read another workspace's
        shutil.copy(ROOT / "metrics" / "eval.json", work / "default-eval.json")
    budget = args.budget or ours_seconds
    print(f"peers: ours took {ours_seconds:.0f} s; heretic gets {budget:.0f} s", flush=True)
    ran = run_heretic(p, Path(venv), work, args, budget)

    baseline = json.loads((work / "default-eval.json").read_text())
    base_row = row("base", "base", baseline, when="before")
    doc = json.loads((work / "search.json").read_text())
    count = doc["validation"]["harmful"]["count"]
    ours = [row("ours", "default", baseline, own="metrics/eval.json")]
    for trial, why in our_picks(doc, ran["saved"], args.matches):
        out = work / "ours" / f"trial-{trial}"
        record = next(t for t in doc["trials"] if t["trial"] == trial)
        ours.append(row("ours", f"trial {trial}{why}", judged(p, out, log, lambda: (write_point(p, work, trial, out), True)),
                        own=f"{record['refusals_proxy']}/{count}, KL {record['kl']:.3f}"))
    for scale in args.scales:
        out = work / "ours" / f"scale-{scale:g}"
        ours.append(row("ours", f"default, scale {scale:g}",
                        judged(p, out, log, lambda: (write_point(p, work, None, out, scale), True)),
                        own="-S ablate.scale"))
    theirs = []
    for point in ran["saved"]:
        out = work / "heretic-models" / f"eval-{point['trial']}"
        theirs.append(row("heretic", f"trial {point['trial']}", judged(p, out, log, lambda: sys.exit(f"peers: {out} lost")),
                          own=f"{point['refusals']}/{point['prompts']}, KL {point['kl']:.3f}"))
    run = {"label": args.label, "trials": args.trials, "ours_seconds": ours_seconds, "heretic_seconds": ran["seconds"],
           "heretic_trials": ran["trials"], "budget": budget, "rows": [base_row, *ours, *theirs]}
    (work / "points.json").write_text(json.dumps(run, indent=1) + "\n")
    report(run)


def run_heretic(p: dict, venv: Path, work: Path, args, budget: float) -> dict:
    """heretic for ``budget`` seconds; saves and evaluates up to ``--heretic-front`` points of its front.
    Kept in ``work/heretic.json`` (``--resume`` reuses it)."""
    done = work / "heretic.json"
    if args.resume and done.is_file():
        ran = json.loads(done.read_text())
        print(f"peers: heretic's run from {done} ({ran['trials']} trials in {ran['seconds']:.0f} s)", flush=True)
        return ran
    for stale in ("heretic", "heretic-models"):
        shutil.rmtree(work / stale, ignore_errors=True)
    heretic = Heretic(venv, work / "heretic", work / "heretic.log")
    (work / "heretic").mkdir()
    start = time.perf_counter()
    heretic.start(heretic_config(p, work / "heretic", args.heretic_tokens, args.heretic_startup, system_prompt(p)))
    heretic.stop_after(budget)
    menu, at, exit_choice = heretic.front()
    seconds = time.perf_counter() - start
    trials = heretic.buffer.count("Elapsed time")  # printed once per finished trial
    print(f"peers: heretic ran {trials} trials in {seconds:.0f} s; front of {len(menu)}", flush=True)
    saved = spread([m for m in menu if m["kl"] <= 1.0] or menu[-1:], args.heretic_front)
    for point in saved:
        at = heretic.save(point["choice"], work / "heretic-models" / f"trial-{point['trial']}", at)
    heretic.finish(exit_choice)
    for point in saved:
        folder = work / "heretic-models" / f"trial-{point['trial']}"
        judged(p, work / "heretic-models" / f"eval-{point['trial']}", work / "ours.log", lambda: (folder, True))
    ran = {"seconds": seconds, "trials": trials, "budget": budget, "menu": menu, "saved": saved}
    done.write_text(json.dumps(ran, indent=1) + "\n")
    return ran


def our_picks(doc: dict, saved: list[dict], matches: int = 2) -> list[tuple[int, str]]:
    """The search's chosen trial, and for each saved heretic point the two points of our front with
    the fewest refusals whose validation KL is at most that point's (both tools score trials on the
    same validation prompts, first-token KL): the ones of ours that should dominate it."""
    front = sorted((t for t in doc["trials"] if t["pareto"]), key=lambda t: t["kl"])
    picks: dict[int, str] = {}
    if doc.get("chosen"):
        picks[doc["chosen"]["trial"]] = " (search's pick)"
    for point in saved:
        within = [t for t in front if t["kl"] <= point["kl"]]
        for t in within[-matches:][::-1]:  # two: the validation KL ranks the tools' points a little differently
            picks.setdefault(t["trial"], f" (vs heretic {point['trial']})")
    return list(picks.items())


def report(run: dict) -> None:
    """The table, the dominance verdict, plots/peers.csv and the SVG, from the evaluated points."""
    rows = run["rows"]
    ours = [r for r in rows if r["tool"] == "ours"]
    theirs = [r for r in rows if r["tool"] == "heretic"]
    budget_kl = next(r for r in ours if r["point"] == "default")["kl_first_token"]
    for points in ([r for r in ours if r["point"] != "default"], theirs):
        for r in points:
            r.pop("chosen", None)
        pick = chosen(points, budget_kl)
        if pick is not None:
            pick["chosen"] = True
    print()
    print(f"| {run['label']} | refusals | over-refusal | kl_first_token | kl_answer | own validation | dominated by |")
    print("|---|---:|---:|---:|---:|---|---|")
    for r in rows:
        by = ""
        if r["tool"] == "heretic":
            winners = [o["point"] for o in ours if dominates(o, r)]
            by = ", ".join(winners) if winners else "**none**"
        mark = " *" if r.get("chosen") else ""
        print(f"| {r['tool']} {r['point']}{mark} | {r['refusals']:.1%} | {r['over_refusal']:.1%} | "
              f"{r['kl_first_token']:.3f} | {r['kl_answer']:.3f} | {r['own']} | {by} |")
    print(f"\nwall time: ours {run['ours_seconds']:.0f} s (measurement + {run['trials']}-trial search), heretic "
          f"{run['heretic_seconds']:.0f} s ({run['heretic_trials']} trials, stopped at {run['budget']:.0f} s); "
          f"* = the tool's chosen point (fewest refusals with first-token KL <= our default's, {budget_kl:.3f})")
    undominated = [r["point"] for r in theirs if not any(dominates(o, r) for o in ours)]
    print("our front dominates heretic's" if not undominated else f"not dominated: heretic {', '.join(undominated)}")
    write_csv(rows, ROOT / "plots" / "peers.csv", run["label"])
    write_svg(rows, ROOT / "plots" / f"peers-{run['label']}.svg", run["label"])

if __name__ == "__main__":
    main()
