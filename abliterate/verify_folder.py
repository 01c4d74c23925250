"""verify's checks of an ablated folder as a whole: plan, provenance, model card, other files, shard identity.

Nothing here trusts the ablated folder: the plan is rebuilt from the base model and the directions
file with the function ``plan`` uses (:func:`abliterate.edits.build_edits`, then
:func:`abliterate.formats.plans.shard_documents`), ``abliteration.json`` and ``README.md`` are
rebuilt with finalize's own functions from that plan and compared, every other file must be
byte-identical to the base's file of the same name, and a shard whose header is another base
shard's is named as swapped or renamed (ablate never changes a header, so the header bytes
identify a shard).

Each check returns a list of problems, one line each (empty: passed).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from abliterate.errors import fail

FLOAT_SLACK = 1e-9  # relative: a rebuilt plan vector may differ from the stored one by fp64 rounding only


def first_difference(expected, got, where: str = "") -> str | None:
    """The first place where two JSON documents differ (``None`` if equal; floats within :data:`FLOAT_SLACK`)."""
    if isinstance(expected, dict) and isinstance(got, dict):
        for key in sorted(set(expected) | set(got), key=str):
            if key not in got or key not in expected:
                return f"{where}/{key}: {'missing' if key not in got else 'not expected'}"
            found = first_difference(expected[key], got[key], f"{where}/{key}")
            if found:
                return found
        return None
    if isinstance(expected, list) and isinstance(got, list):
        if len(expected) != len(got):
            return f"{where}: {len(got)} entries, expected {len(expected)}"
        for i, (a, b) in enumerate(zip(expected, got)):
            found = first_difference(a, b, f"{where}[{i}]")
            if found:
                return found
        return None
    numbers = (int, float)
    if (isinstance(expected, numbers) and isinstance(got, numbers) and not isinstance(expected, bool)
            and not isinstance(got, bool)):
        if expected == got or abs(expected - got) <= FLOAT_SLACK * max(abs(expected), abs(got)):
            return None
    elif expected == got and type(expected) is type(got):
        return None
    return f"{where}: {_short(got)}, expected {_short(expected)}"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def rebuilt_plan(base: Path, settings: dict, plans: dict, directions: Path) -> dict[str, dict]:
    """The shard documents ``plan`` writes for these settings, rebuilt from the base model and the directions."""
    from abliterate.edits import build_edits
    from abliterate.formats.directions import load_directions
    from abliterate.model.modelio import read_config, text_config, weight_map
    from abliterate.quant.expand import plan_documents
    from abliterate.records import AblationOptions, LayerEdit

    config = text_config(read_config(base))
    tensors, _ = load_directions(directions)
    defaults = settings["defaults"]
    options = AblationOptions(norm_preserve=bool(defaults["norm_preserve"]), projected=bool(defaults["projected"]),
                              sparsity=float(defaults["sparsity"]), targets=tuple(defaults["targets"]))
    try:
        layer_edits = [LayerEdit.from_json(doc) for doc in settings["layers"]]
    except (KeyError, TypeError, ValueError, AttributeError):
        fail("the plan settings' per-layer entries lack layer, measurement, scale or sparsity; rerun `dvc repro plan`")
    # the embeddings' measurement (the best index when the layers use per-layer ones) is stored in their edits only
    embedded = [e.measurement for plan in plans.values() for e in plan.edits if e.layer is None]
    default = LayerEdit(-1, embedded[0] if embedded else 0, float(defaults["scale"]), options.sparsity)
    names = weight_map(base)
    edits, _ = build_edits(base, names, config, tensors, layer_edits, options, default)
    mode = str(defaults.get("quantized_edits", "requantize"))
    return plan_documents(base, names, edits, settings["shards"], int(config["hidden_size"]), mode)[1]


def check_plan(base: Path, settings: dict, plans: dict, directions: Path) -> list[str]:
    """The plan folder against the plan rebuilt from the base model and the directions file."""
    rebuilt = rebuilt_plan(base, settings, plans, directions)
    found = first_difference(rebuilt, {key: plan.doc for key, plan in plans.items()}, "plan")
    return [] if found is None else [f"the plan differs from the one rebuilt from {directions}: {found}"]


def check_settings(settings, where) -> None:
    """The plan settings verify reads are there, of the right kinds; one line naming ``where`` if not."""
    kinds = {"shards": dict, "hidden_size": int, "layers": list, "defaults": dict}
    if not isinstance(settings, dict) or not all(isinstance(settings.get(k), t) for k, t in kinds.items()):
        fail(f"the plan settings in {where} lack shards, hidden_size, layers or defaults; verify needs the plan "
             "this model was ablated with (rerun `dvc repro plan`)")
    defaults = {"norm_preserve": bool, "projected": bool, "sparsity": (int, float), "scale": (int, float),
                "targets": list}
    if not all(isinstance(settings["defaults"].get(k), t) for k, t in defaults.items()):
        fail(f"the plan settings in {where} lack the ablation options ({', '.join(defaults)}); rerun `dvc repro plan`")


def provenance_plan(ablated: Path) -> tuple[dict, dict]:
    """``(settings, {shard key: shard plan})`` as the ablated folder's own ``abliteration.json`` states them."""
    from abliterate.formats.plans import parse_shard_plan
    from abliterate.formats.provenance import PROVENANCE, read_provenance

    doc = read_provenance(ablated)
    plans = {key: parse_shard_plan(plan, f"{PROVENANCE} (shard {key})") for key, plan in sorted(doc["plan"].items())}
    return doc["settings"], plans


def check_provenance(base: Path, ablated: Path, settings: dict, plans: dict, directions: Path | None,
                     shard_hashes: dict[str, str], total_tensors: int) -> list[str]:
    """``abliteration.json`` and ``README.md`` against what finalize writes from this plan (the tool's
    version aside); ``shard_hashes``: the base shards' sha256, ``total_tensors``: the base's tensor count;
    ``directions`` None: the directions' name and hash are taken as stated."""
    from abliterate.formats.provenance import CARD, PROVENANCE, provenance, read_provenance
    from abliterate.hashing import sha256_file
    from abliterate.model.modelio import read_config
    from abliterate.model_card import model_card

    config = read_config(base)
    got = dict(read_provenance(ablated))
    stated = got.get("directions") if isinstance(got.get("directions"), dict) else {}
    name, sha = ((stated.get("file"), stated.get("sha256")) if directions is None
                 else (Path(directions).name, sha256_file(directions)))
    expected = provenance(config, settings, {key: plan.doc for key, plan in plans.items()}, shard_hashes, name, sha)
    expected.pop("tool"), got.pop("tool", None)
    problems = []
    found = first_difference(expected, got, "")
    if found is not None:
        problems.append(f"{PROVENANCE} does not match the plan, the directions and the base: {found.lstrip('/')}")
    edits = [e for _, plan in sorted(plans.items()) for e in plan.edits]
    card = model_card(config, settings, edits, total_tensors)
    path = Path(ablated) / CARD
    if not path.is_file() or path.read_text(encoding="utf-8", errors="replace") != card:
        problems.append(f"{CARD} is not the model card finalize writes for this plan")
    return problems


def check_other_files(base: Path, ablated: Path, shards: set[str], changes: dict | None = None
                      ) -> tuple[int, int, list[str]]:
    """``(base files, those as expected, problems)``: every non-weight file is the base's, byte for byte
    (the config and index with ``changes`` applied, :func:`abliterate.formats.plan_output.carried_bytes`, when
    tensors were written as bfloat16); nothing extra but the provenance and the card."""
    from abliterate.formats.model_yaml import carried_files
    from abliterate.formats.provenance import CARD, PROVENANCE
    from abliterate.formats.plan_output import carried_bytes

    carried = sorted(carried_files(Path(base)).values())
    problems, same = [], 0
    for name in carried:
        path = Path(ablated) / name
        if not path.is_file():
            problems.append(f"{name} is missing from the ablated folder")
        elif path.read_bytes() != carried_bytes(name, (Path(base) / name).read_bytes(), changes):
            problems.append(f"{name} differs from the base model's" + (" (with the bfloat16 edits' changes)"
                                                                       if changes else ""))
        else:
            same += 1
    expected = set(carried) | shards | {PROVENANCE, CARD}
    for path in sorted(Path(ablated).iterdir()):
        if not path.name.startswith(".") and path.name not in expected:
            problems.append(f"{path.name} is not a file of the base model (nor abliteration.json, README.md)")
    return len(carried), same, problems


def header_bytes(path: Path) -> bytes | None:
    """The raw header (length + JSON) of a safetensors file, ``None`` if it has none."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                return None
            (length,) = struct.unpack("<Q", raw)
            if length > os.fstat(handle.fileno()).st_size:
                return None
            return raw + handle.read(length)
    except OSError:
        return None


def check_shards(base: Path, ablated: Path, files: list[str], rewritten: dict[str, tuple[bytes, int]] | None = None
                 ) -> tuple[list[str], list[str]]:
    """``(shards whose header and size are as expected, problems)``: the base's, or for the shards in
    ``rewritten`` (file -> (header bytes, size): bfloat16 edits) those; a header found under another name is
    named as a swap."""
    rewritten = rewritten or {}
    base_headers = {f: rewritten[f][0] if f in rewritten else header_bytes(Path(base) / f) for f in files}
    present = sorted(p.name for p in Path(ablated).glob("*.safetensors"))
    abl_headers = {f: header_bytes(Path(ablated) / f) for f in present}
    same, problems = [], []
    for file in files:
        if abl_headers.get(file) is not None and abl_headers[file] == base_headers[file]:
            size = (Path(ablated) / file).stat().st_size
            expected = rewritten[file][1] if file in rewritten else (Path(base) / file).stat().st_size
            if size == expected:
                same.append(file)
            else:
                problems.append(f"shard {file} has {size} bytes, the base's {expected}: truncated or extended")
            continue
        elsewhere = [f for f in present if f != file and abl_headers[f] == base_headers[file]]
        if elsewhere:
            problems.append(f"base shard {file} is in the ablated folder as {elsewhere[0]}: shards swapped or renamed")
        elif file not in abl_headers:
            problems.append(f"shard {file} is missing from the ablated folder")
        else:
            problems.append(f"shard {file}'s header differs from the " + ("one the bfloat16 edits give" if file in rewritten
                            else "base's") + " (names, dtypes, shapes or offsets)")
    return same, problems
