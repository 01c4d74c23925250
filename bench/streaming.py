"""Benchmark of the layer-streamed capture against the in-memory one, on a model of several GB.

Builds a random Llama-style model (default hidden 2048, 20 layers, vocabulary 32000: about 4.2 GB
of float32 weights in 200 MB shards) and ``--prompts`` random prompts, then runs the capture stage
(``python -m stages.capture``) twice in the same run, each in a fresh process measured from a small
parent: ``--streaming off`` (the whole model loaded) and ``--streaming on`` (one decoder layer at a
time). It prints wall time, CPU time and peak RSS of each, the ratios, and whether both wrote the
same activations. Targets: streamed peak RSS at most 25% of the model's bytes, streamed wall time
at most 1.5x the in-memory one.

    python bench/streaming.py [--prompts 256] [--layers 20] [--hidden 2048] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ablate import timed  # noqa: E402  (bench/ is the script's folder)
from capture import make_model, make_prompts  # noqa: E402


def same_activations(a: Path, b: Path) -> float:
    """The largest difference between the two parquet files' activations, relative to each row's scale."""
    import numpy as np
    import pyarrow.parquet as pq

    rows = []
    for path in (a, b):
        table = pq.read_table(path).sort_by([("prompt", "ascending"), ("position", "ascending"), ("layer", "ascending")])
        hidden = table.schema.field("activation").type.list_size
        rows.append(table.column("activation").combine_chunks().flatten().to_numpy().reshape(-1, hidden))
    scale = np.abs(rows[0]).max(axis=1, keepdims=True)
    return float((np.abs(rows[0] - rows[1]) / scale).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/abliterate-bench-streaming"))
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    root = args.dir
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        started = time.perf_counter()
        model = make_model(root / "model", args.layers, args.hidden, args.vocab)
        prompts = make_prompts(root / "prompts.txt", args.prompts)
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        shards = len(list(model.glob("*.safetensors")))
        print(f"built {size / 1e9:.2f} GB in {shards} shards in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        runs = {}
        for mode in ("off", "on"):
            cmd = [sys.executable, "-m", "stages.capture", "--model", str(model), "--prompts", str(prompts),
                   "--out", str(root / f"{mode}.parquet"), "--batch-size", str(args.batch_size),
                   "--dtype", "float32", "--device", "cpu", "--streaming", mode]
            runs[mode] = timed(cmd, env)
        diff = same_activations(root / "off.parquet", root / "on.parquet")
        (wall_m, cpu_m, rss_m), (wall_s, cpu_s, rss_s) = runs["off"], runs["on"]
        print(f"model {size / 1e9:.2f} GB ({args.layers} layers, hidden {args.hidden}), {args.prompts} prompts, "
              f"{os.cpu_count()} CPUs\n")
        print("| capture | wall s | CPU s | peak RSS GB | RSS / model bytes |")
        print("|---|---:|---:|---:|---:|")
        for name, (wall, cpu, rss) in (("in memory", runs["off"]), ("streamed", runs["on"])):
            print(f"| {name} | {wall:.1f} | {cpu:.1f} | {rss / 1e9:.2f} | {rss / size:.2f} |")
        print(f"\nstreamed / in-memory wall time: {wall_s / wall_m:.2f} (target <= 1.5); CPU {cpu_s / cpu_m:.2f}")
        print(f"streamed peak RSS / model bytes: {rss_s / size:.2f} (target <= 0.25); in memory {rss_m / size:.2f}")
        print(f"largest activation difference, relative: {diff:.2e} (0 = the same bytes)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
