"""``carry@KEY``: copy one non-weight file of the base model (config, tokenizer, chat template,
index) into the ablated folder unchanged, or, when the plan writes edited quantized tensors as
bfloat16 (``ablate.quantized-edits``), the config and index with those tensors' changes
(:func:`abliterate.formats.plan_output.carried_bytes`).

The stage's command holds only the key (``carry@tokenizer-config``), which ``abliterate use``
generated from a strict pattern; the file name, which the model folder controls, is looked up here
in model.yaml and never reaches a shell. The copy is written beside the target and renamed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from abliterate.errors import fail


def carry(model_yaml: str | Path, key: str, base: str | Path, out: str | Path, plan: str | Path | None = None) -> Path:
    """Copy ``base/<files[key]>`` to ``out/<files[key]>`` atomically; return the written path. ``plan``:
    the plan folder, whose output changes apply to the config and the index."""
    from abliterate.formats.atomic import atomic_path, same_file
    from abliterate.formats.model_yaml import read_files

    files = read_files(model_yaml)
    if key not in files:
        fail(f"{model_yaml} lists no file under the key {key!r} (keys: {', '.join(sorted(files)) or 'none'}); "
             "run `abliterate use SOURCE` again")
    source, target = Path(base) / files[key], Path(out) / files[key]
    if not source.is_file():
        fail(f"{source} does not exist; model.yaml is out of date: run `abliterate use SOURCE` again")
    if target.exists() and same_file(source, target):
        fail(f"{target} is the base model's own file; --out must be another folder")
    changes = None
    if plan is not None:
        from abliterate.formats.plan_output import read_changes

        changes = read_changes(Path(plan))
    with atomic_path(target) as tmp:
        if changes is None:
            shutil.copyfile(source, tmp)
        else:
            from abliterate.formats.plan_output import carried_bytes

            tmp.write_bytes(carried_bytes(files[key], source.read_bytes(), changes))
    return target
