"""Benchmark of the ablate stage: shard editing vs a plain copy of the same files, peak memory.

Builds a random bf16 Llama-shaped model (hidden 4096, MLP 14336, 3 layers per shard, so every
shard is about 1.3 GB, like real 2-5 GB checkpoints), plans the removal of a direction from every
layer (attention and MLP writers: about a third of each shard's bytes), then measures in one run:

* ``cp`` of every shard file into an empty folder, wall time;
* ``python -m stages.ablate`` on every shard, one process each, wall time incl. process start;
* the CPU time (user + system) of both, less sensitive to a busy machine than wall time;
* the peak RSS of each ablate process (measured from a small parent) against the largest shard.

Copies and ablations alternate shard by shard for ``--repeat`` rounds (best of each kept, and
which goes first alternates too), so both see the same machine load. Targets: ablate time at most
2x the copy, peak RSS below half of the largest shard.

``--format fp8`` stores the same Llama shapes as block-scaled FP8 (random E4M3 codes, float32
``weight_scale_inv`` per 128x128 block); ``--format mxfp4`` builds gpt-oss shapes (hidden 2880,
``--experts`` experts of 2880, bf16 attention, MXFP4 ``*_blocks``/``*_scales`` experts) and edits
attention and experts: every quantized target is de-quantized, edited and quantized back.

    python bench/ablate.py [--format bf16|fp8|mxfp4] [--shards 4] [--layers-per-shard 3] [--repeat 5]
                           [--experts 8] [--targets attention,mlp] [--quantized-edits requantize|bfloat16]
                           [--dir DIR] [--keep]

``--targets attention`` is the pipeline's default (only ``o_proj``: about 8% of a Llama layer's bytes);
``--quantized-edits bfloat16`` writes the edited quantized tensors unquantized (larger shards).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, MLP, KV, VOCAB = 4096, 14336, 1024, 32000
OSS_HIDDEN, OSS_HEADS, OSS_KV, OSS_HEAD_DIM = 2880, 64, 8, 64  # gpt-oss-20b's attention and expert sizes


def _fp8(rows: int, cols: int, gen) -> tuple:
    """Random E4M3 codes (no NaN) and float32 block scales of a ``[rows, cols]`` weight."""
    import math

    import torch

    codes = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=gen)
    codes[(codes & 0x7F) == 0x7F] = 0x7E
    scales = torch.rand(math.ceil(rows / 128), math.ceil(cols / 128), generator=gen) * 1e-4 + 1e-4
    return codes.view(torch.float8_e4m3fn), scales


def build_oss(folder: Path, shards: int, per_shard: int, experts: int) -> dict[str, str]:
    """gpt-oss shapes: bf16 attention and router, MXFP4 experts (random codes, exponents 118-124)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    h, q, kv = OSS_HIDDEN, OSS_HEADS * OSS_HEAD_DIM, OSS_KV * OSS_HEAD_DIM
    weight_map, table = {}, {}

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    def mx(*shape):  # [E, out, in] -> blocks [E, out, in/32, 16], scales [E, out, in/32]
        e, out, inp = shape
        return (torch.randint(0, 256, (e, out, inp // 32, 16), dtype=torch.uint8, generator=gen),
                torch.randint(118, 125, (e, out, inp // 32), dtype=torch.uint8, generator=gen))

    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {"model.embed_tokens.weight": rand(VOCAB, h)} if s == 0 else {}
        for k in range(s * per_shard, (s + 1) * per_shard):
            p = f"model.layers.{k}."
            gate_up, down = mx(experts, 2 * h, h), mx(experts, h, h)
            tensors.update({
                p + "self_attn.q_proj.weight": rand(q, h), p + "self_attn.k_proj.weight": rand(kv, h),
                p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, q),
                p + "self_attn.o_proj.bias": rand(h), p + "self_attn.sinks": rand(OSS_HEADS),
                p + "mlp.router.weight": rand(experts, h), p + "mlp.router.bias": rand(experts),
                p + "mlp.experts.gate_up_proj_blocks": gate_up[0], p + "mlp.experts.gate_up_proj_scales": gate_up[1],
                p + "mlp.experts.gate_up_proj_bias": rand(experts, 2 * h),
                p + "mlp.experts.down_proj_blocks": down[0], p + "mlp.experts.down_proj_scales": down[1],
                p + "mlp.experts.down_proj_bias": rand(experts, h),
                p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            })
        if s == shards - 1:
            tensors["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
            tensors["lm_head.weight"] = rand(VOCAB, h)
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})
        table[f"{s + 1:05d}"] = name
        del tensors
    config = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": h,
              "intermediate_size": h, "num_local_experts": experts, "num_hidden_layers": shards * per_shard,
              "num_attention_heads": OSS_HEADS, "num_key_value_heads": OSS_KV, "head_dim": OSS_HEAD_DIM,
              "vocab_size": VOCAB, "tie_word_embeddings": False, "dtype": "bfloat16",
              "quantization_config": {"quant_method": "mxfp4"}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return table


def build_model(folder: Path, shards: int, per_shard: int, fmt: str = "bf16") -> dict[str, str]:
    """Random bf16 (or block-scaled FP8) weights in ``shards`` files; returns the shard table {key: file}."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    layers = shards * per_shard
    weight_map, table = {}, {}

    def rand(*shape):
        return (torch.randn(*shape) * 0.02).to(torch.bfloat16)

    def linear(name: str, rows: int, cols: int) -> dict:
        if fmt != "fp8":
            return {name: rand(rows, cols)}
        codes, scales = _fp8(rows, cols, gen)
        return {name: codes, name + "_scale_inv": scales}

    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        if s == 0:
            tensors["model.embed_tokens.weight"] = rand(VOCAB, HIDDEN)
        for k in range(s * per_shard, (s + 1) * per_shard):
            p = f"model.layers.{k}."
            for suffix, rows, cols in (("self_attn.q_proj", HIDDEN, HIDDEN), ("self_attn.k_proj", KV, HIDDEN),
                                       ("self_attn.v_proj", KV, HIDDEN), ("self_attn.o_proj", HIDDEN, HIDDEN),
                                       ("mlp.gate_proj", MLP, HIDDEN), ("mlp.up_proj", MLP, HIDDEN),
                                       ("mlp.down_proj", HIDDEN, MLP)):
                tensors.update(linear(p + suffix + ".weight", rows, cols))
            tensors.update({
                p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
            })
        if s == shards - 1:
            tensors["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
            tensors["lm_head.weight"] = rand(VOCAB, HIDDEN)
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})
        table[f"{s + 1:05d}"] = name
        del tensors
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": MLP, "num_hidden_layers": layers, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": VOCAB, "tie_word_embeddings": False, "dtype": "bfloat16"}
    if fmt == "fp8":
        config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128],
                                         "activation_scheme": "dynamic"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return table


def write_inputs(root: Path, layers: int, hidden: int = HIDDEN) -> None:
    import torch

    from abliterate.formats.directions import save_directions

    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(layers + 1):
        harmless = torch.randn(hidden, generator=gen)
        direction = torch.randn(hidden, generator=gen)
        tensors.update({f"harmless_mean.{i}": harmless, f"harmful_mean.{i}": harmless + direction,
                        f"direction.{i}": direction, f"unit.{i}": direction / direction.norm()})
    tensors = {name: t.numpy() for name, t in tensors.items()}
    tensors.update({"count.harmful": torch.tensor([8]).numpy(), "count.harmless": torch.tensor([8]).numpy()})
    save_directions(tensors, {"num_layers": str(layers), "hidden_size": str(hidden), "num_indices": str(layers + 1)},
                    root / "directions.safetensors")


# Runs a command and prints its peak RSS: measured from a small parent, since a child forked from
# this (large) process would report this process's memory as its own peak.
WRAP = ("import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
        "sys.stderr.buffer.write(r.stderr)\n"
        "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(u.ru_utime + u.ru_stime, u.ru_maxrss)\n"
        "sys.exit(r.returncode)\n")


def timed(cmd: list[str], env: dict) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (bytes) of one command.

    Dirty pages are flushed first (untimed), so that no command pays for the writeback of the
    one before it (the model build writes gigabytes just before the first measurement)."""
    os.sync()
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-S", "-c", WRAP, *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr}")
    cpu, rss = result.stdout.split()[-2:]
    return wall, float(cpu), int(rss) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/abliterate-bench"))
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--layers-per-shard", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5, help="rounds of cp/ablate per shard; the best is kept")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--format", choices=("bf16", "fp8", "mxfp4"), default="bf16", help="how the weights are stored")
    parser.add_argument("--experts", type=int, default=8, help="experts per layer (mxfp4)")
    parser.add_argument("--targets", default="", help="comma list of roles edited (default: attention and the "
                        "MLP/experts; `attention` is the pipeline's default)")
    parser.add_argument("--quantized-edits", choices=("requantize", "bfloat16"), default="requantize",
                        help="ablate.quantized-edits of the plan")
    args = parser.parse_args()
    root = args.dir
    shutil.rmtree(root, ignore_errors=True)
    try:
        run(root, args.shards, args.layers_per_shard, args.repeat, args.format, args.experts,
            tuple(args.targets.split(",")) if args.targets else None, args.quantized_edits)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def run(root: Path, shards: int, per_shard: int, repeat: int, fmt: str = "bf16", experts: int = 8,
        targets: tuple[str, ...] | None = None, quantized_edits: str = "requantize") -> None:
    import yaml

    from abliterate.planning import plan
    from abliterate.records import AblationOptions

    layers = shards * per_shard
    t0 = time.perf_counter()
    if fmt == "mxfp4":
        table = build_oss(root / "base", shards, per_shard, experts)
    else:
        table = build_model(root / "base", shards, per_shard, fmt)
    (root / "model.yaml").write_text(yaml.safe_dump({"shards": table}))
    write_inputs(root, layers, OSS_HIDDEN if fmt == "mxfp4" else HIDDEN)
    print(f"built {shards} {fmt} shards ({layers} layers) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    t0 = time.perf_counter()
    targets = targets or (("attention", "experts") if fmt == "mxfp4" else ("attention", "mlp"))
    plan(root / "base", root / "model.yaml", root / "directions.safetensors", None, root / "plan",
         layers=f"0-{layers - 1}", measurement=str(layers // 2), options=AblationOptions(targets=targets),
         quantized_edits=quantized_edits)
    plan_s = time.perf_counter() - t0
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    sizes = {k: (root / "base" / f).stat().st_size for k, f in table.items()}
    (root / "copy").mkdir()
    (root / "model").mkdir()
    cp: dict[str, tuple[float, float]] = {}
    ablated: dict[str, tuple[float, float, int]] = {}
    for round_ in range(repeat):  # interleaved, so both see the same machine load; best of each kept
        for key, name in table.items():
            for target in (root / "copy" / name, root / "model" / name):
                target.unlink(missing_ok=True)
            copy = ["cp", str(root / "base" / name), str(root / "copy" / name)]
            edit = [sys.executable, "-m", "stages.ablate", "--base", str(root / "base" / name),
                    "--plan", str(root / "plan" / f"{key}.json"), "--out", str(root / "model" / name)]
            # Which goes first alternates: on a VM, the command that follows another one's big write
            # can be the one that pays for fresh memory pages (seen as up to 3x its system time).
            for which in (("cp", "ablate") if round_ % 2 == 0 else ("ablate", "cp")):
                wall, cpu, rss = timed(copy if which == "cp" else edit, env)
                if which == "cp":
                    old = cp.get(key, (wall, cpu))
                    cp[key] = (min(old[0], wall), min(old[1], cpu))
                else:
                    old = ablated.get(key, (wall, cpu, rss))
                    ablated[key] = (min(old[0], wall), min(old[1], cpu), max(old[2], rss))
    edited = {k: len(json.loads((root / "plan" / f"{k}.json").read_text())["edits"]) for k in table}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"plan: {plan_s:.1f} s for {sum(edited.values())} tensors; {os.cpu_count()} CPUs, load average {load:.1f}\n")
    print("| shard | GB | edited | cp wall s | ablate wall s | wall ratio | cp CPU s | ablate CPU s | CPU ratio "
          "| peak RSS GB | RSS / shard |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key in table:
        wall, cpu, rss = ablated[key]
        print(f"| {key} | {sizes[key] / 1e9:.2f} | {edited[key]} | {cp[key][0]:.2f} | {wall:.2f} | {wall / cp[key][0]:.2f} "
              f"| {cp[key][1]:.2f} | {cpu:.2f} | {cpu / max(cp[key][1], 1e-3):.2f} | {rss / 1e9:.2f} "
              f"| {rss / sizes[key]:.2f} |")
    total_cp, total_ab = sum(c[0] for c in cp.values()), sum(a[0] for a in ablated.values())
    cpu_cp, cpu_ab = sum(c[1] for c in cp.values()), sum(a[1] for a in ablated.values())
    peak, largest = max(a[2] for a in ablated.values()), max(sizes.values())
    print(f"\ntotal wall: ablate {total_ab:.1f} s vs cp {total_cp:.1f} s -> ratio {total_ab / total_cp:.2f} (target <= 2)")
    print(f"total CPU: ablate {cpu_ab:.1f} s vs cp {cpu_cp:.1f} s -> ratio {cpu_ab / max(cpu_cp, 1e-3):.2f}")
    print(f"peak RSS {peak / 1e9:.2f} GB vs largest shard {largest / 1e9:.2f} GB -> {peak / largest:.2f} (target < 0.5)")


if __name__ == "__main__":
    main()
