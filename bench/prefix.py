"""Benchmark: capture with the chat template's shared prefix run once per pass, vs every token per batch.

Builds the random Llama-style model of ``bench/capture.py`` (default 12 layers, hidden 512) and random
prompts of varied length, rendered with a system prompt as long as SmolLM2's default one (the demo's
template adds it), then runs ``capture_batches`` over all prompts with ``shared_prefix`` off and on,
alternately, ``--repeats`` times each, in one process. Prints the seconds of each, their ratio, the
share of tokens the prefix holds, and the largest relative difference between the two captures
(per captured vector; the capture keeps the prefix only under 1e-4).

    python bench/prefix.py [--prompts 256] [--layers 12] [--hidden 512] [--batch-size 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    import torch

    from abliterate.model.hooks import capture_batches
    from abliterate.model.modelio import load_model, load_tokenizer
    from abliterate.model.prefix import agreement, shared_length
    from abliterate.model.prompts import load_prompts, render
    from bench.capture import make_model, make_prompts

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_model(Path(tmp) / "model", args.layers, args.hidden, 32000)
        prompts = make_prompts(Path(tmp) / "prompts.txt", args.prompts)
        tokenizer = load_tokenizer(folder)
        sequences = render(tokenizer, load_prompts(prompts), system_prompt=SYSTEM)
        model = load_model(folder)
        pad = tokenizer.pad_token_id
        seconds = {False: [], True: []}
        kept = {}
        for _ in range(args.repeats):
            for shared in (False, True):
                acts = []
                started = time.perf_counter()
                capture_batches(model, sequences, [-1], args.batch_size, pad, lambda batch, a: acts.append(a),
                                shared_prefix=shared)
                seconds[shared].append(time.perf_counter() - started)
                kept[shared] = np.concatenate(acts, axis=1)  # [L+1, N, 1, H], batch order is the same
    prefix = shared_length(sequences)
    tokens = sum(len(s) for s in sequences)
    plain, shared = min(seconds[False]), min(seconds[True])
    print(f"{len(sequences)} prompts, {tokens} tokens, shared prefix {prefix} tokens "
          f"({prefix * len(sequences) / tokens:.0%} of all tokens); {args.layers} layers, hidden {args.hidden}")
    print(f"every token per batch: {plain:.2f} s   shared prefix once: {shared:.2f} s   "
          f"ratio {shared / plain:.2f} (best of {args.repeats})")
    print(f"largest relative difference per captured vector: {agreement(kept[False], kept[True]):.1e}")


if __name__ == "__main__":
    main()
