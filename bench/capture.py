"""Benchmark: capture (hooks, one forward pass per batch) vs the naive generate() baseline.

Builds a random Llama-style model (default 12 layers, hidden 512, vocabulary 32000) and random
prompts of varied length, renders them with the chat template, then times, on the same batches
(sorted by length, left padded):

* ``capture``: ``stages.capture.capture_batches`` (forward pre-hooks, only the last position is
  kept, the pass stops after the last layer);
* ``baseline``: the naive way, ``model.generate(max_new_tokens=1, output_hidden_states=True,
  return_dict_in_generate=True)`` on batches taken in prompt order, keeping every layer's
  last-token state;
* ``baseline-sorted``: the same ``generate`` call on capture's length-sorted batches, to show how
  much of the gain is the batching and how much the forward pass itself.

Timing runs in one process that loads the model once and, batch after batch, runs the three
methods alternately, so that a busy machine slows all of them alike. It prints the time ratios.
Peak memory: the ``capture()`` stage (model load, rendering, hooks, parquet) runs in a fresh
subprocess with N and with 2N prompts, the naive baseline with N; their peak RSS shows whether
memory grows with the prompt count.

    python bench/capture.py [--prompts 256] [--layers 12] [--hidden 512] [--batch-size 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the a how why what make write explain give list some my your best way to of for with about story "
         "recipe code plan bank lock garden history poem letter email cat river city machine music").split()


def make_model(folder: Path, layers: int, hidden: int, vocab: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny import make_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 128), max_position_embeddings=2048,
                         bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="200MB")
    make_tokenizer().save_pretrained(folder)
    return folder


def make_prompts(path: Path, count: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 24))) + f" #{i}" for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def token_lists(model_dir: Path, prompts: Path):
    from abliterate.model.modelio import load_tokenizer
    from abliterate.model.prompts import load_prompts, render

    tokenizer = load_tokenizer(model_dir)
    return tokenizer, render(tokenizer, load_prompts(prompts))


def run_capture(model, sequences, batch_size: int, pad_id: int) -> int:
    from abliterate.model.hooks import capture_batches

    kept = []
    capture_batches(model, sequences, [-1], batch_size, pad_id, lambda batch, acts: kept.append(acts[:, :, 0].copy()))
    return sum(a.shape[1] for a in kept)


def run_baseline(model, sequences, batch_size: int, pad_id: int, sort: bool = False) -> int:
    import torch

    from abliterate.model.modelio import length_batches, pad_left

    if sort:
        batches = length_batches([len(s) for s in sequences], batch_size)
    else:
        batches = [list(range(i, min(i + batch_size, len(sequences)))) for i in range(0, len(sequences), batch_size)]
    kept = []
    with torch.no_grad():
        for batch in batches:
            ids, mask, _ = pad_left([sequences[i] for i in batch], pad_id)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                                 output_hidden_states=True, return_dict_in_generate=True, pad_token_id=pad_id)
            kept.append(torch.stack([h[:, -1, :] for h in out.hidden_states[0]]).clone())  # [L+1, B, H]
    return sum(k.shape[1] for k in kept)


def timing(model_dir: Path, prompts: Path, batch_size: int) -> dict:
    """Seconds of each method over the same prompts, measured batch by batch, alternating."""
    import torch

    from abliterate.model.modelio import length_batches, load_model

    tokenizer, sequences = token_lists(model_dir, prompts)
    model = load_model(model_dir)
    pad = tokenizer.pad_token_id
    seconds = {"capture": 0.0, "baseline": 0.0, "baseline-sorted": 0.0}
    sorted_batches = length_batches([len(s) for s in sequences], batch_size)
    naive_batches = [list(range(i, min(i + batch_size, len(sequences)))) for i in range(0, len(sequences), batch_size)]
    run_capture(model, sequences[:batch_size], batch_size, pad)  # warm-up
    with torch.no_grad():
        for sorted_batch, naive_batch in zip(sorted_batches, naive_batches):
            for name, fn, batch in (("capture", run_capture, sorted_batch),
                                    ("baseline-sorted", run_baseline, sorted_batch),
                                    ("baseline", run_baseline, naive_batch)):
                subset = [sequences[i] for i in batch]
                started = time.perf_counter()
                fn(model, subset, batch_size, pad)  # one batch: sorting inside changes nothing
                seconds[name] += time.perf_counter() - started
    return seconds


def child(args) -> None:
    """One measurement in a fresh process: prints JSON (times or seconds, rows, peak_rss_mb)."""
    import torch

    torch.set_num_threads(args.threads)
    model_dir, prompts = Path(args.model_dir), Path(args.prompt_file)
    if args.mode == "timing":
        print(json.dumps(timing(model_dir, prompts, args.batch_size)))
        return
    if args.mode == "stage":
        from abliterate.model.capture import capture

        started = time.perf_counter()
        rows = capture(model_dir, str(prompts), Path(args.out), batch_size=args.batch_size)["prompts"]
    else:
        from abliterate.model.modelio import load_model

        tokenizer, sequences = token_lists(model_dir, prompts)
        model = load_model(model_dir)
        started = time.perf_counter()
        rows = run_baseline(model, sequences, args.batch_size, tokenizer.pad_token_id)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "rows": rows, "peak_rss_mb": peak}))


def measure(args, mode: str, prompts: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--model-dir", str(args.model_dir), "--prompt-file", str(prompts),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["timing", "baseline", "stage"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-file", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        child(args)
        return

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with tempfile.TemporaryDirectory(prefix="bench-capture-") as tmp:
        tmp = Path(tmp)
        args.model_dir = make_model(tmp / "model", args.layers, args.hidden, args.vocab)
        small = make_prompts(tmp / "small.txt", args.prompts)
        large = make_prompts(tmp / "large.txt", 2 * args.prompts, seed=1)
        print(f"model: Llama-style, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; "
              f"{args.prompts} prompts, batch {args.batch_size}, {args.threads} threads")
        times = measure(args, "timing", small, tmp / "x.parquet")
        memory = {"stage": measure(args, "stage", small, tmp / "stage.parquet"),
                  "stage-2x": measure(args, "stage", large, tmp / "stage2.parquet"),
                  "baseline": measure(args, "baseline", small, tmp / "x.parquet")}

    cap = times["capture"]
    print(f"{'capture (hooks, length-sorted batches)':<48} {cap:8.2f} s")
    for name, label in (("baseline", "generate, prompt-order batches (naive)"),
                        ("baseline-sorted", "generate, the same length-sorted batches")):
        print(f"{label:<48} {times[name]:8.2f} s   capture is {times[name] / cap:.2f}x faster")
    print(f"capture stage end to end (load + render + hooks + parquet): {memory['stage']['seconds']:.2f} s")
    one, two = memory["stage"]["peak_rss_mb"], memory["stage-2x"]["peak_rss_mb"]
    print(f"peak RSS: capture stage {one:.0f} MB with {args.prompts} prompts, {two:.0f} MB with "
          f"{2 * args.prompts} ({two / one:.2f}x); naive generate baseline {memory['baseline']['peak_rss_mb']:.0f} MB")

if __name__ == "__main__":
    main()
