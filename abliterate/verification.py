"""Verification of an ablated model against its base model, the plan and the directions, tensor by tensor.

``abliterate verify BASE ABLATED --plan PLAN_DIR --directions FILE`` (defaults: the pipeline's
``artifacts/plan`` and ``artifacts/directions.safetensors``) trusts nothing in ABLATED; streaming
both models chunk by chunk it checks (:mod:`abliterate.verify_folder`, :mod:`abliterate.verify_tensors`):

* the plan is the one ``plan`` builds from BASE and the directions with its settings (rebuilt);
* ``abliteration.json`` and ``README.md`` are what finalize writes from that plan (BASE's shard
  hashes and the directions' hash included; the tool version aside);
* every other file (config, tokenizer, chat template, index, ...) is BASE's, byte for byte, and
  there is no file BASE does not have;
* every shard header (names, dtypes, shapes, offsets, ``__metadata__``) is byte-identical; a
  header found under another shard's name is reported as swapped or renamed shards;
* every tensor the plan does not edit is byte-identical;
* every edited tensor is what ablate's own producer computes from BASE's tensor and the plan:
  bit-identical on the machine that ablated it, else within the stored dtype's rounding;
* every edited tensor's residual write has no component along its direction ``r``, reported as
  the max over columns (rows for the residual-last layouts) of ``|r . (g * w)| / |g * w|`` where
  ``g`` is the norm gain in between (for routers, readers: ``|w . (g * r)| / (|w| |g * r|)``);
  checked where the edit's scale is 1 (other scales leave part of the direction on purpose);
* norm-preserving edits kept every column's (row's) norm;
* a target stored quantized (FP8, MXFP4, NVFP4) is compared de-quantized, its codes and scales
  counted as the tensor itself: its component and norm drift may be at most twice what plain
  re-quantization of the exact edit leaves (the floor, shown in the layer's label;
  :mod:`abliterate.quant.check`).

Tolerance: ``--tolerance`` or, by default, ``max(1e-5, 16 u / sqrt(hidden))`` with ``u`` the
unit roundoff of the stored dtype (rounding to bf16 re-injects a little of ``r``); for the norm
drift at least ``u`` itself: rounding every element of a column moves its norm by at most ``u``
relative, and a column dominated by one large element (outlier features) gets close to that
bound (measured: 2.8e-3 on a bf16 column of 576 where the first bound is 2.6e-3). A table goes
to stderr; the exit code is 1 if any check fails.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from abliterate.errors import fail
from abliterate.formats.safetensors_io import read_header
from abliterate.records import Edit
from abliterate.verify_tensors import recompute, recompute_quantized

ROUNDOFF = {"F64": 2.0**-53, "F32": 2.0**-24, "F16": 2.0**-11, "BF16": 2.0**-8}


def tolerance_for(dtype: str, hidden: int, override: float = 0.0) -> float:
    return override if override > 0 else max(1e-5, 16 * ROUNDOFF.get(dtype, 2.0**-8) / math.sqrt(hidden))


def norm_tolerance_for(dtype: str, hidden: int, override: float = 0.0) -> float:
    """Largest relative column-norm drift that rounding to ``dtype`` can cause (fp32 slack added)."""
    if override > 0:
        return override
    return max(tolerance_for(dtype, hidden), ROUNDOFF.get(dtype, 2.0**-8) * (1 + 1e-3) + 1e-6)


def _same_bytes(fd_a: int, fd_b: int, begin: int, end: int, shift: int = 0) -> bool:
    """Bytes ``begin:end`` of ``fd_a`` equal those ``shift`` bytes further in ``fd_b``."""
    pos = begin
    while pos < end:
        n = min(end - pos, 16 * 1024 * 1024)
        if os.pread(fd_a, n, pos) != os.pread(fd_b, n, pos + shift):
            return False
        pos += n
    return True


def edited_metrics(fd_base: int, fd_abl: int, info, edits: list[Edit], gain, info_abl=None) -> tuple[float, float]:
    """``(max relative component along r, max relative norm drift)`` of one edited tensor (fp64); ``info_abl``:
    where it lies in the ablated file (default: where it lies in the base's)."""
    import numpy as np

    from abliterate.formats.safetensors_io import read_rows, row_chunks

    last = edits[-1]
    r, u = np.asarray(last.direction, dtype=np.float64), np.asarray(last.vector, dtype=np.float64)
    s = float(last.scale)
    g = gain if gain is not None else np.ones_like(r)
    gr = g * r
    comp, drift = 0.0, 0.0
    info_abl = info if info_abl is None else info_abl
    if last.layout == "columns":  # [hidden, in]: columns are the writes
        cols = info.shape[1]
        num, den, na, nb, ub = (np.zeros(cols) for _ in range(5))
        for a, b in row_chunks(info):
            new = read_rows(fd_abl, info_abl, a, b).astype(np.float64)
            old = read_rows(fd_base, info, a, b).astype(np.float64)
            num += gr[a:b] @ new
            den += ((g[a:b, None] * new) ** 2).sum(0)
            na += (new**2).sum(0)
            nb += (old**2).sum(0)
            ub += u[a:b] @ old
        live = den > 0
        comp = float((np.abs(num[live]) / np.sqrt(den[live])).max()) if live.any() else 0.0
        kept = (nb > 0) & (1 - (2 * s - s * s) * ub**2 / np.maximum(nb, 1e-300) > 1e-6)
        if kept.any():
            drift = float((np.abs(np.sqrt(na) - np.sqrt(nb))[kept] / np.sqrt(nb[kept])).max())
        return comp, drift
    reader = last.role == "router"
    for a, b in row_chunks(info):
        new = read_rows(fd_abl, info_abl, a, b).astype(np.float64)  # [rows, hidden]
        old = read_rows(fd_base, info, a, b).astype(np.float64)
        dots = np.abs(new @ gr)
        scale = np.linalg.norm(new, axis=1) * np.linalg.norm(gr) if reader else np.linalg.norm(new * g, axis=1)
        live = scale > 0
        if live.any():
            comp = max(comp, float((dots[live] / scale[live]).max()))
        nb, na = np.linalg.norm(old, axis=1), np.linalg.norm(new, axis=1)
        kept = (nb > 0) & (1 - (2 * s - s * s) * (old @ u) ** 2 / np.maximum(nb**2, 1e-300) > 1e-6)
        if kept.any():
            drift = max(drift, float((np.abs(na - nb)[kept] / nb[kept]).max()))
    return comp, drift


def verify(base: Path, ablated: Path, plan_dir: Path | None = Path("artifacts/plan"),
           directions: Path | None = Path("artifacts/directions.safetensors"), tolerance: float = 0.0,
           ) -> tuple[list[list[str]], bool]:
    """Run every check; returns the table rows (a failed check's row names what failed) and whether all passed.

    ``plan_dir`` None: the plan is the one the ablated folder's ``abliteration.json`` states (a model
    without the pipeline's artifacts; a provenance rewritten together with the tensors then goes
    unseen); ``directions`` None: the plan is not rebuilt from them (a "skip" row).
    """
    from abliterate.errors import existing
    from abliterate.formats.plans import read_plan_dir
    from abliterate.hashing import sha256_file
    from abliterate.model.modelio import check_model_dir, weight_map
    from abliterate.verify_folder import check_other_files, check_plan, check_provenance, check_shards
    from abliterate.shard_edit import check as check_shard_plan
    from abliterate.verify_folder import check_settings, provenance_plan

    check_model_dir(base)
    check_model_dir(ablated)
    if plan_dir is not None:
        existing(plan_dir, "folder", "plan folder", "verify rebuilds the edits from the plan: pass --plan (the "
                 "pipeline's artifacts/plan), run `dvc repro plan`, or pass --from-provenance",
                 "pass the plan folder (artifacts/plan)")
    if directions is not None:
        existing(directions, "file", "directions file", "pass --directions (the pipeline's "
                 "artifacts/directions.safetensors) or run `dvc repro reduce`", "pass the directions file")
    settings, plans = read_plan_dir(plan_dir) if plan_dir is not None else provenance_plan(ablated)
    where = plan_dir if plan_dir is not None else Path(ablated) / "abliteration.json"
    check_settings(settings, where)
    names = weight_map(base)
    files = sorted(set(names.values()))
    if files != sorted(settings["shards"].values()):
        fail(f"the plan in {where} is for shards {sorted(settings['shards'].values())} but {base} holds {files}; "
             "verify needs the plan this model was ablated with")
    edits: dict[str, list[Edit]] = {}
    for key, plan in sorted(plans.items()):  # ablate's own check: the plan fits the base shard (names, dtypes, shapes)
        file = settings["shards"][key]
        edits.update(check_shard_plan(Path(base) / file, plan, None))
    from abliterate.quant.check import converted_metrics, covered, quantized_metrics
    from abliterate.quant.expand import converted_records, main_name, new_layout, output_changes
    from abliterate.quant.expand import header_bytes as layout_header
    from abliterate.quant.registry import stored_names

    stored_as = covered(edits)  # quantized targets: their codes and scales, measured de-quantized
    # ablate.quantized-edits bfloat16: shards written with a new header, config and index changed with them
    changes = output_changes(base, {key: plan.doc for key, plan in plans.items()})
    converted, expected_headers, base_headers = {}, {}, {}
    for key, plan in sorted(plans.items()):
        records = converted_records(plan.doc)
        if records:
            file = settings["shards"][key]
            header = base_headers[file] = read_header(Path(base) / file)
            layout = new_layout(header, records)
            head = layout_header(layout, header.metadata)
            expected_headers[file] = (head, len(head) + sum(entry[3] for entry in layout))
            converted[file] = records
    rows: list[list[str]] = []

    def checked(label: str, problems: list[str], value: str = "") -> None:
        rows.append([label, value or ("yes" if not problems else "no"), "", _ok(not problems)])
        rows.extend([f"  {problem}", "", "", "FAIL"] for problem in problems)

    if plan_dir is None:
        rows.append(["plan: as abliteration.json states it (--from-provenance)", "not checked", "", "skip"])
    if directions is None:
        rows.append(["plan rebuilt from the directions", "no directions file", "", "skip"])
    else:
        checked(f"plan rebuilt from the base and {Path(directions).name}",
                check_plan(base, settings, plans, directions))
    hashes = {f: sha256_file(Path(base) / f) for f in files}
    checked("abliteration.json and README.md as finalize writes them",
            check_provenance(base, ablated, settings, plans, directions, hashes, len(names)))
    count, same_files, problems = check_other_files(base, ablated, set(files),
                                                    changes if changes["not_converted"] else None)
    checked("other files identical to the base" + (" (config and index: bfloat16 edits)" if converted else ""),
            problems, f"{same_files}/{count}")
    same, problems = check_shards(base, ablated, files, expected_headers)
    checked("shard headers identical" + (f" ({len(converted)} rewritten for bfloat16 edits)" if converted else ""),
            problems, f"{len(same)}/{len(files)}")
    hidden = int(settings["hidden_size"])
    per_layer: dict = {}
    untouched, untouched_ok, recomputed = 0, 0, []
    for file in same:  # (a shard with another header was reported above: its tensors cannot be compared)
        hb = base_headers.get(file) or read_header(Path(base) / file)
        ha = read_header(Path(ablated) / file)
        records = {name: (record, shape) for name, record, shape in converted.get(file, [])}
        as_bf16 = {n: name for name, (record, _) in records.items() for n in stored_names(record)}
        fd_b, fd_a = os.open(Path(base) / file, os.O_RDONLY), os.open(Path(ablated) / file, os.O_RDONLY)
        try:
            for stored_name, info in sorted(hb.tensors.items()):
                if stored_name in as_bf16:  # written as bfloat16: checked once, in place of its main stored tensor
                    name = as_bf16[stored_name]
                    if stored_name != main_name(records[name][0]):
                        continue
                else:
                    name, measured_by = stored_as.get(stored_name, (stored_name, True))
                    if not measured_by:
                        continue
                tensor_edits = edits.get(name)
                if tensor_edits is None and name not in records:
                    untouched += 1
                    moved = ha.tensors.get(name)
                    untouched_ok += int(moved is not None and _same_bytes(fd_b, fd_a, info.begin, info.end,
                                                                          moved.begin - info.begin))
                    continue
                gname = tensor_edits[-1].gain if tensor_edits else None
                gain = None
                if gname:
                    gain = _vector(Path(base) / names[gname], gname) + float(tensor_edits[-1].gain_offset)
                if name in records:
                    result, comp, drift = converted_metrics(Path(base) / file, Path(ablated) / file, name,
                                                            *records[name], tensor_edits, gain)
                    recomputed.append((name, result))
                    if tensor_edits is None:  # a converted module's unedited tensor: its exact de-quantization
                        continue
                    tol, tolerance_floor = tolerance_for("BF16", hidden, tolerance), None
                    norm_tol = norm_tolerance_for("BF16", hidden, tolerance)
                elif tensor_edits[0].storage is not None:
                    recomputed.append((name, recompute_quantized(Path(base) / file, Path(ablated) / file,
                                                                 tensor_edits)))
                    found = quantized_metrics(Path(base) / file, Path(ablated) / file, tensor_edits, gain)
                    comp, drift, tol, norm_tol = found["comp"], found["drift"], found["tol"], found["norm_tol"]
                    tolerance_floor = found["floor"]
                else:
                    moved = ha.tensors.get(name, info)
                    recomputed.append((name, recompute(fd_b, fd_a, info, tensor_edits,
                                                       ROUNDOFF.get(info.dtype, 2.0**-8), at=moved.begin)))
                    comp, drift = edited_metrics(fd_b, fd_a, info, tensor_edits, gain, moved)
                    tol = tolerance_for(info.dtype, hidden, tolerance)
                    norm_tol, tolerance_floor = norm_tolerance_for(info.dtype, hidden, tolerance), None
                check_comp = float(tensor_edits[-1].scale) == 1.0
                check_norm = all(e.norm_preserve for e in tensor_edits)
                ok = (not check_comp or comp <= tol) and (not check_norm or drift <= norm_tol)
                layer = tensor_edits[-1].layer
                entry = per_layer.setdefault(layer, {"n": 0, "comp": None, "drift": None, "ok": True, "tol": tol})
                entry["n"] += 1
                entry["ok"] &= ok
                entry["tol"] = max(entry["tol"], tol)
                if tolerance_floor is not None:
                    entry["floor"] = max(entry.get("floor", 0.0), tolerance_floor)
                if check_comp:
                    entry["comp"] = max(entry["comp"] or 0.0, comp)
                if check_norm:
                    entry["drift"] = max(entry["drift"] or 0.0, drift)
        finally:
            os.close(fd_b)
            os.close(fd_a)
    rows.append(["untouched tensors byte-identical", f"{untouched_ok}/{untouched}", "", _ok(untouched_ok == untouched)])
    exact = sum(r.identical for _, r in recomputed)
    within = sum(r.ok for _, r in recomputed)
    value = f"{exact}/{len(recomputed)} bit-identical" + ("" if exact == within else f", {within} within rounding")
    checked("edited tensors recomputed from the base and the plan", [
        f"{name}: {r.outside} of {r.elements} values differ from the recomputed edit (max |diff| {r.worst:.3g})"
        for name, r in recomputed if not r.ok], value)
    for layer in sorted(per_layer, key=lambda k: -1 if k is None else k):
        e = per_layer[layer]
        label = "embeddings" if layer is None else f"layer {layer}: {e['n']} tensors"
        if "floor" in e:  # quantized targets: the component plain re-quantization would leave
            label += f" (re-quantization floor {e['floor']:.2e})"
        comp = "n/a (scale != 1)" if e["comp"] is None else f"{e['comp']:.2e}"
        drift = "n/a (plain)" if e["drift"] is None else f"{e['drift']:.2e}"
        rows.append([label, comp, drift, _ok(e["ok"])])
    passed = all(row[-1] != "FAIL" for row in rows)
    return rows, passed


def _vector(path: Path, name: str):
    """A 1-D tensor (a norm weight) as fp64 numpy, any float dtype including bf16."""
    import numpy as np

    from abliterate.formats.safetensors_io import read_header, read_rows

    info = read_header(path).tensors[name]
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_rows(fd, info, 0, 1).astype(np.float64).reshape(-1)
    finally:
        os.close(fd)


def _ok(flag: bool) -> str:
    return "ok" if flag else "FAIL"
