"""Does a built demo model refuse, and is its refusal mediated by one direction?

    python bench/demo.py models/base [--n 60] [--tokens 24] [--index 24]

1. Greedy answers (``--tokens`` tokens) to the first ``--n`` held-out prompts of
   prompts/eval/harmful.txt and prompts/eval/harmless.txt: refusal rate and over-refusal rate
   (abliterate.refusal's marker list).
2. A quick in-memory abliteration with hooks: the difference of means of the last-prompt-token
   residual entering layer ``--index`` (prompts/harmful.txt vs prompts/harmless.txt), made
   orthogonal to the harmless mean, is removed from the output of every attention and MLP block
   (what editing their weights does). The same answers again: if the refusal rate collapses, the
   default pipeline has a direction to find and remove.

Prints the rates before and after, and a few answers. Threads: ``--threads`` (default 2).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def answers(model, tokenizer, prompts: list[str], tokens: int) -> list[str]:
    from abliterate.model.prompts import render
    from abliterate.sources.tune import self_answers

    eos = tokenizer.eos_token_id
    out = self_answers(model, render(tokenizer, prompts), tokens, eos, tokenizer.pad_token_id)
    return [tokenizer.decode([t for t in ids if t != eos]) for ids in out]


def rate(model, tokenizer, name: str, prompts: list[str], tokens: int, show: int) -> float:
    from abliterate.refusal import is_refusal

    start = time.time()
    texts = answers(model, tokenizer, prompts, tokens)
    refused = [is_refusal(t) for t in texts]
    share = sum(refused) / len(refused)
    print(f"{name:<28} refused {sum(refused):3d}/{len(refused)} = {share:6.1%}   ({time.time() - start:.0f} s)")
    for prompt, text, r in list(zip(prompts, texts, refused))[:show]:
        print(f"    [{'R' if r else ' '}] {prompt[:60]!r} -> {text[:70]!r}")
    return share


def last_token_means(model, tokenizer, prompts: list[str], index: int):
    """fp64 mean of the residual entering decoder layer ``index`` at the last prompt token."""
    import torch

    from abliterate.model.modelio import length_batches, pad_left
    from abliterate.model.prompts import render

    ids = render(tokenizer, prompts)
    total = None
    for batch in length_batches([len(x) for x in ids], 32):
        input_ids, mask, positions = pad_left([ids[i] for i in batch], tokenizer.pad_token_id)
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        rows = out.hidden_states[index][:, -1, :].double().sum(dim=0)  # [H]
        total = rows if total is None else total + rows
    return total / len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--index", type=int, default=-1, help="residual index (default: 0.8 x layers, 24 for the demo)")
    parser.add_argument("--show", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from abliterate.model.modelio import decoder_layers, load_model, load_tokenizer
    from abliterate.model.prompts import load_prompts

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device="cpu"), load_tokenizer(args.model)
    harmful = load_prompts(ROOT / "prompts/eval/harmful.txt")[: args.n]
    harmless = load_prompts(ROOT / "prompts/eval/harmless.txt")[: args.n]
    before = (rate(model, tokenizer, "harmful", harmful, args.tokens, args.show),
              rate(model, tokenizer, "harmless (over-refusal)", harmless, args.tokens, args.show))

    layers = decoder_layers(model)
    index = args.index if args.index >= 0 else int(0.8 * len(layers))
    bad = last_token_means(model, tokenizer, load_prompts(ROOT / "prompts/harmful.txt"), index)
    good = last_token_means(model, tokenizer, load_prompts(ROOT / "prompts/harmless.txt"), index)
    unit_good = good / good.norm()
    direction = (bad - good) - ((bad - good) @ unit_good) * unit_good
    r = (direction / direction.norm()).float()
    print(f"direction at residual index {index}: |harmful - harmless| = {(bad - good).norm():.2f}, "
          f"|harmless mean| = {good.norm():.2f}")

    def remove(module, inputs, output):
        return output - (output @ r)[..., None] * r

    for layer in layers:
        layer.self_attn.o_proj.register_forward_hook(remove)
        layer.mlp.down_proj.register_forward_hook(remove)
    after = (rate(model, tokenizer, "harmful, ablated", harmful, args.tokens, args.show),
             rate(model, tokenizer, "harmless, ablated", harmless, args.tokens, args.show))
    print(f"refusal rate {before[0]:.1%} -> {after[0]:.1%}; over-refusal {before[1]:.1%} -> {after[1]:.1%}")


if __name__ == "__main__":
    main()
