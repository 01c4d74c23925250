"""Helpers for the ablation-engine tests: synthetic directions, running plan + ablate, hooks.

Nothing here re-derives the edit formulas: results are checked by reloading the written model
with transformers and measuring what its layers write into the residual stream.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml


def write_directions(path: Path, num_layers: int, hidden: int = 64, seed: int = 0) -> Path:
    """A directions file in reduce's layout: random means, direction = harmful - harmless."""
    import torch

    from abliterate.formats.directions import save_directions

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(num_layers + 1):
        harmless = torch.randn(hidden, generator=gen, dtype=torch.float64) + 0.5
        harmful = harmless + 0.8 * torch.randn(hidden, generator=gen, dtype=torch.float64)
        direction = harmful - harmless
        tensors[f"harmful_mean.{i}"] = harmful.float()
        tensors[f"harmless_mean.{i}"] = harmless.float()
        tensors[f"direction.{i}"] = direction.float()
        tensors[f"unit.{i}"] = (direction / direction.norm()).float()
    tensors["count.harmful"] = torch.tensor([8], dtype=torch.int64)
    tensors["count.harmless"] = torch.tensor([8], dtype=torch.int64)
    meta = {"num_layers": str(num_layers), "hidden_size": str(hidden), "num_indices": str(num_layers + 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_directions({name: t.numpy() for name, t in tensors.items()}, meta, path)
    return path


def write_scores(path: Path, num_layers: int, best: int, hidden: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"best_index": best, "best_quality": 1.0, "num_layers": num_layers,
                                "hidden_size": hidden}))
    return path


def write_model_yaml(model: Path, path: Path) -> Path:
    from abliterate.formats.model_yaml import shard_table
    from abliterate.model.modelio import shard_files

    others = sorted(p.name for p in model.iterdir() if p.is_file() and not p.name.endswith(".safetensors"))
    doc = {"shards": shard_table(shard_files(model)), "files": {n.split(".")[0].replace("_", "-"): n for n in others}}
    path.write_text(yaml.safe_dump(doc, sort_keys=True))
    return path


OPTION_NAMES = ("norm_preserve", "projected", "sparsity", "targets")


CLASSIC = {"measurement": "auto", "scale": 1.0}  # one measured direction, removed (scale 1)


def pop_options(settings: dict):
    """The :class:`AblationOptions` named by keywords in ``settings`` (removed from it), as on the command
    line (``targets`` a comma list). Unless a test says otherwise these tests edit every writer with
    biprojection: they were written for it (the harder case, a different ``r`` per layer); plain
    removal and the pipeline's defaults have tests of their own."""
    from abliterate.records import AblationOptions
    from abliterate.targets import parse_targets

    options = {k: settings.pop(k) for k in OPTION_NAMES if k in settings}
    options.setdefault("projected", True)
    options.setdefault("targets", "attention,mlp,experts,shared-experts")
    if "targets" in options:
        options["targets"] = parse_targets(options["targets"])
    return AblationOptions(**options)


def run_plan(model: Path, shards: Path, directions: Path, scores: Path | None, out: Path, **settings):
    """``abliterate.planning.plan`` with the ablation options given as keywords (see :func:`pop_options`);
    the measurement and scale are :data:`CLASSIC` unless given."""
    from abliterate.planning import plan

    options = pop_options(settings)
    return plan(model, shards, directions, scores, out, options=options, **{**CLASSIC, **settings})


def plan_and_ablate(model: Path, work: Path, **settings) -> Path:
    """Run plan, then ablate every shard and copy the other files: returns the ablated folder."""
    from abliterate.formats.plans import load_shard_plan
    from abliterate.shard_edit import ablate_shard

    num_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    directions = work / "directions.safetensors"
    if not directions.exists():
        write_directions(directions, num_layers, seed=settings.pop("seed", 0))
    scores = write_scores(work / "layers.json", num_layers, best=settings.pop("best", max(1, num_layers // 2)))
    shards = write_model_yaml(model, work / "model.yaml")
    run_plan(model, shards, directions, scores, work / "plan", **settings)
    out = work / "model"
    out.mkdir(exist_ok=True)
    table = yaml.safe_load(shards.read_text())
    for key, name in table["shards"].items():
        ablate_shard(model / name, load_shard_plan(work / "plan" / f"{key}.json"), out / name)
    from abliterate.formats.plan_output import carried_bytes, read_changes

    changes = read_changes(work / "plan")  # the carry stage's work: config and index change with bfloat16 edits
    for name in table["files"].values():
        (out / name).write_bytes(carried_bytes(name, (model / name).read_bytes(), changes))
    return out


def plan_edits(work: Path) -> list[tuple[dict, dict]]:
    """Every (edit, vectors table) of the plan folder."""
    import torch

    found = []
    for path in sorted((work / "plan").glob("[!_]*.json")):
        doc = json.loads(path.read_text())
        vectors = {k: torch.tensor(v, dtype=torch.float64) for k, v in doc["vectors"].items()}
        found.extend((e, vectors) for e in doc["edits"])
    return found


def layer_writes(model_dir: Path, prompts: int = 3, length: int = 12, seed: int = 1) -> dict[int, "object"]:
    """Per decoder layer, what it adds to the residual stream on random tokens: ``[tokens, hidden]`` fp64."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    layers = model.model.layers
    writes: dict[int, torch.Tensor] = {}

    def hook(index):
        def fn(module, args, kwargs, output):
            before = args[0] if args else kwargs["hidden_states"]
            after = output[0] if isinstance(output, tuple) else output
            writes[index] = (after - before).detach().double().reshape(-1, after.shape[-1])
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    ids = torch.randint(0, 250, (prompts, length))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    for handle in handles:
        handle.remove()
    return writes


def relative_component(writes, r) -> float:
    """max over tokens of |write . r| / |write| (r a unit vector)."""
    r = r.double() / r.double().norm()
    return float(((writes @ r).abs() / writes.norm(dim=1).clamp_min(1e-30)).max())
