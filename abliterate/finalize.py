"""Finalize an ablated model folder: its provenance (``abliteration.json``) and model card (``README.md``).

The weight shards come from the ``ablate@<shard>`` stages and the other files of the folder
(config, generation config, tokenizer, chat template, index, remote code) from the ``carry@<file>``
stages; this writes only the two files that describe what was done.
"""

from __future__ import annotations

from pathlib import Path

from abliterate.errors import fail
from abliterate.progress import PLAIN, Reporter


def finalize(base: Path, plan_dir: Path, directions: Path, out: Path, report: Reporter = PLAIN) -> dict:
    """Write ``out/abliteration.json`` and ``out/README.md``; returns the provenance document."""
    from abliterate.formats.atomic import same_file, write_text
    from abliterate.formats.plans import read_plan_dir
    from abliterate.formats.provenance import CARD, PROVENANCE, provenance, write_provenance
    from abliterate.hashing import sha256_file
    from abliterate.model.modelio import check_model_dir, read_config, weight_map
    from abliterate.model_card import model_card

    check_model_dir(base)
    if Path(out).exists() and same_file(base, out):
        fail(f"the output folder {out} is the base model folder; write the ablated model elsewhere")
    if not Path(directions).is_file():
        fail(f"directions file {directions} does not exist; run `dvc repro reduce` first")
    settings, plans = read_plan_dir(plan_dir)
    names = weight_map(base)
    files = sorted(set(names.values()))
    if files != sorted(settings["shards"].values()):
        fail(f"the plan in {plan_dir} is for shards {sorted(settings['shards'].values())} but {base} holds {files}; "
             "rerun `abliterate use` and `dvc repro plan`")
    paths = [Path(base) / f for f in files] + [Path(directions)]
    with report.task("finalize: hashing", total=sum(p.stat().st_size for p in paths), unit="bytes") as task:
        hashes = {p.name: sha256_file(p, task.advance) for p in paths}
    config = read_config(base)
    doc = provenance(config, settings, {key: plan.doc for key, plan in plans.items()}, {f: hashes[f] for f in files},
                     Path(directions).name, hashes[Path(directions).name])
    edits = [e for plan in plans.values() for e in plan.edits]
    write_provenance(out, doc)
    write_text(Path(out) / CARD, model_card(config, settings, edits, len(names)))
    report.message(f"finalize: {out}/{PROVENANCE} and {out}/{CARD} written ({len({e.tensor for e in edits})} "
                   "tensors edited)")
    return doc
