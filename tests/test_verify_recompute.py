"""verify recomputes: each tampering of an ablated folder fails with a line that names it; an honest folder passes.

The folder is a tiny gemma3 model in bf16 (norm gains folded into the edit vectors, bf16 rounding),
ablated by plan + ablate + finalize as the pipeline does it; the tamperings are those of issue 15.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import tiny
from ablation_util import plan_and_ablate
from abliterate.finalize import finalize
from abliterate.formats.safetensors_io import FLOAT_DTYPES, read_header
from stages.cliutil import run_app
from stages.verify import app

WRITER = "model.layers.1.self_attn.o_proj.weight"  # an edited writer [hidden, in] (columns layout)


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    root = tmp_path_factory.mktemp("recompute")
    base = tiny.make_model("gemma3", root / "base", layers=2, dtype="bfloat16")
    out = plan_and_ablate(base, root, layers="0-1", measurement="1")
    finalize(base, root / "plan", root / "directions.safetensors", out)
    return base, out, root / "plan", root / "directions.safetensors"


def _verify(base, out, plan, directions, capsys) -> tuple[int, list[str]]:
    try:
        run_app(app, [str(base), str(out), "--plan", str(plan), "--directions", str(directions)])
        code = 0
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("verify: FAILED")]


def _copy(out, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    return broken


def _patch_tensor(folder, name, change) -> None:
    """Rewrite one bf16 tensor's bytes in place (header untouched), as raw uint16 values."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    path = folder / index["weight_map"][name]
    info = read_header(path).tensors[name]
    data = bytearray(path.read_bytes())
    values = np.frombuffer(bytes(data[info.begin:info.end]), dtype=FLOAT_DTYPES[info.dtype][0]).reshape(info.shape)
    data[info.begin:info.end] = change(values.copy()).tobytes()
    path.write_bytes(bytes(data))


def _negate(bits):  # bf16 sign bit
    return bits ^ np.uint16(0x8000)


def test_the_honest_folder_passes_bit_identical(honest, capsys):
    code, failed = _verify(*honest, capsys)
    assert code == 0 and failed == []
    from abliterate.verification import verify

    rows, passed = verify(*honest)
    row = next(r for r in rows if r[0].startswith("edited tensors recomputed"))
    plans = [json.loads(path.read_text()) for path in honest[2].glob("0*.json")]
    edited = sum(len({e["tensor"] for e in doc["edits"]}) for doc in plans)
    assert passed and row[1] == f"{edited}/{edited} bit-identical" and edited >= 4


@pytest.mark.parametrize("column", [True, False], ids=["one-column", "whole-tensor"])
def test_a_negated_writer_fails(honest, tmp_path, capsys, column):
    base, out, plan, directions = honest
    broken = _copy(out, tmp_path)

    def negate(bits):
        if column:
            bits[:, 3] = _negate(bits[:, 3])
            return bits
        return _negate(bits)

    _patch_tensor(broken, WRITER, negate)
    code, failed = _verify(base, broken, plan, directions, capsys)
    assert code == 1
    line = next(f for f in failed if WRITER in f)
    assert "differ from the recomputed edit" in line
    count = int(line.split(f"{WRITER}: ")[1].split(" of ")[0])
    rows, cols = read_header_shape(base, WRITER)
    negated = rows if column else rows * cols
    assert 0.9 * negated <= count <= negated  # every negated value but the (rare) zeros is caught


def read_header_shape(folder, name):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return read_header(folder / index["weight_map"][name]).tensors[name].shape


@pytest.mark.parametrize("name", ["config.json", "chat_template.jinja"])
def test_a_changed_file_fails(honest, tmp_path, capsys, name):
    base, out, plan, directions = honest
    broken = _copy(out, tmp_path)
    path = broken / name
    if name == "config.json":
        config = json.loads(path.read_text())
        config["rms_norm_eps"] = 0.5
        path.write_text(json.dumps(config, indent=2))
    else:
        path.write_text(path.read_text().replace("<start_of_turn>", "<start_of_turn> ", 1) + "\n")
    code, failed = _verify(base, broken, plan, directions, capsys)
    assert code == 1 and f"verify: FAILED: {name} differs from the base model's" in failed


def test_swapped_shards_are_named(honest, tmp_path, capsys):
    base, out, plan, directions = honest
    broken = _copy(out, tmp_path)
    first, second = sorted(p.name for p in broken.glob("*.safetensors"))[:2]
    (broken / first).rename(broken / "swap")
    (broken / second).rename(broken / first)
    (broken / "swap").rename(broken / second)
    code, failed = _verify(base, broken, plan, directions, capsys)
    assert code == 1
    for a, b in ((first, second), (second, first)):
        assert f"verify: FAILED: base shard {a} is in the ablated folder as {b}: shards swapped or renamed" in failed


def test_a_renamed_shard_is_named(honest, tmp_path, capsys):
    base, out, plan, directions = honest
    broken = _copy(out, tmp_path)
    first = sorted(p.name for p in broken.glob("*.safetensors"))[0]
    (broken / first).rename(broken / "weights.safetensors")
    code, failed = _verify(base, broken, plan, directions, capsys)
    assert code == 1
    assert f"verify: FAILED: base shard {first} is in the ablated folder as weights.safetensors: shards swapped or " \
           "renamed" in failed
    assert any("weights.safetensors is not a file of the base model" in f for f in failed)


def test_a_truncated_shard_is_a_failed_check(honest, tmp_path, capsys):
    base, out, plan, directions = honest
    broken = _copy(out, tmp_path)
    shard = sorted(broken.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-64])
    code, failed = _verify(base, broken, plan, directions, capsys)
    assert code == 1 and any(f"shard {shard.name} has" in f and "truncated or extended" in f for f in failed)


def test_a_rewritten_provenance_with_matching_tensors_fails(honest, tmp_path, capsys):
    """abliteration.json rewritten with scales 0.5, and the shards ablated to match it: consistent with
    itself, but not with the plan and the directions."""
    base, out, plan, directions = honest
    work = tmp_path / "half"
    work.mkdir()
    shutil.copy(directions, work / "directions.safetensors")
    half = plan_and_ablate(base, work, layers="0-1", measurement="1", scale=0.5)
    finalize(base, work / "plan", work / "directions.safetensors", half)
    assert json.loads((half / "abliteration.json").read_text())["settings"]["defaults"]["scale"] == 0.5
    code, failed = _verify(base, half, plan, directions, capsys)
    assert code == 1
    assert any("abliteration.json does not match the plan" in f and "scale: 0.5, expected 1.0" in f for f in failed)
    assert any("README.md is not the model card" in f for f in failed)
    assert any(WRITER in f and "differ from the recomputed edit" in f for f in failed)


def test_undone_edits_with_a_provenance_that_says_so_fail(honest, tmp_path, capsys):
    """Every shard put back to the base's bytes and abliteration.json's plan emptied to match."""
    base, out, plan, directions = honest
    broken = _copy(out, tmp_path)
    for shard in base.glob("*.safetensors"):
        shutil.copy(shard, broken / shard.name)
    doc = json.loads((broken / "abliteration.json").read_text())
    for shard_plan in doc["plan"].values():
        shard_plan["edits"], shard_plan["vectors"] = [], {}
    doc["settings"]["edited_tensors"] = {k: 0 for k in doc["settings"]["edited_tensors"]}
    (broken / "abliteration.json").write_text(json.dumps(doc))
    code, failed = _verify(base, broken, plan, directions, capsys)
    assert code == 1
    assert any("abliteration.json does not match the plan" in f and "edits" in f for f in failed)
    assert any(WRITER in f and "differ from the recomputed edit" in f for f in failed)


def test_a_plan_that_is_not_the_directions_fails(honest, tmp_path, capsys):
    """A plan whose vectors were changed (the folder ablated with it would match it) is caught by the rebuild."""
    base, out, plan, directions = honest
    other = tmp_path / "plan"
    shutil.copytree(plan, other)
    path = next(p for p in sorted(other.glob("0*.json")) if json.loads(p.read_text())["edits"])
    doc = json.loads(path.read_text())
    key = sorted(doc["vectors"])[0]
    doc["vectors"][key][0] = -doc["vectors"][key][0]
    path.write_text(json.dumps(doc))
    code, failed = _verify(base, out, other, directions, capsys)
    assert code == 1 and any("the plan differs from the one rebuilt from" in f and key in f for f in failed)


def test_a_missing_plan_is_one_line(honest, tmp_path, capsys):
    base, out, _, directions = honest
    try:
        run_app(app, [str(base), str(out), "--plan", str(tmp_path / "nowhere"), "--directions", str(directions)])
        code = 0
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "plan folder" in err and "--plan" in err


def test_from_provenance_checks_a_downloaded_model_without_the_artifacts(honest, tmp_path, capsys):
    """No plan folder, no directions: the plan as abliteration.json states it; damage is still caught."""
    base, out, _, _ = honest

    def run(folder):
        try:
            run_app(app, [str(base), str(folder), "--from-provenance"])
            return 0, capsys.readouterr().err
        except SystemExit as exc:
            return exc.code, capsys.readouterr().err

    code, err = run(out)
    assert code == 0 and "verify: not checked: plan rebuilt from the directions" in err and "FAILED" not in err
    broken = _copy(out, tmp_path)
    _patch_tensor(broken, WRITER, lambda bits: _negate(bits))
    (broken / "config.json").write_text((broken / "config.json").read_text() + " ")
    code, err = run(broken)
    assert code == 1 and f"verify: FAILED: {WRITER}: " in err and "verify: FAILED: config.json differs" in err


@pytest.mark.parametrize("damage", ["settings", "layers", "shards"])
def test_a_hostile_provenance_is_one_line_with_from_provenance(honest, tmp_path, capsys, damage):
    base, out, _, directions = honest
    broken = _copy(out, tmp_path)
    doc = json.loads((broken / "abliteration.json").read_text())
    if damage == "settings":
        doc["settings"] = {"shards": []}
    elif damage == "layers":
        doc["settings"]["layers"] = [{"layer": "x"}]
    else:
        doc["settings"]["shards"] = {"00001": "../../etc/passwd"}
    (broken / "abliteration.json").write_text(json.dumps(doc))
    try:
        run_app(app, [str(base), str(broken), "--from-provenance", "--directions", str(directions)])
        code = 0
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
