"""Corrupt and hostile model folders, and the failure paths of ablate (issue 15, Found 4, 6, 7).

``use`` refuses a folder with a broken shard header, a hostile or incomplete index, an unsupported
architecture or unknown remote code: one line, exit 2, params.yaml / model.yaml / dvc.yaml byte for
byte as before. ``ablate`` refuses the same headers, NaN weights in a tensor it edits, a full disk
and a read-only output folder, and leaves no temporary file on any exit (Ctrl-C, SIGTERM), removing
those of a killed run. ``reduce`` says whether NaN activations come from the weights or a 16-bit dtype.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
import yaml

import tiny
from ablation_util import plan_and_ablate
from measure_helpers import REPO, error_line, invoke, tree

PIPELINE_FILES = ("dvc.yaml", "params.yaml", "model.yaml")


# ---------------------------------------------------------------- helpers


def split(path):
    """``(header dict, data bytes)`` of a safetensors file."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def join(path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def first_two(header: dict) -> tuple[str, str]:
    """The two tensors stored first in a header."""
    names = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
    return names[0], names[1]


def corrupt(folder, how: str) -> None:
    """Damage the first shard of ``folder`` (or its index, or its config) in one of the ways of issue 15."""
    shard = sorted(folder.glob("*.safetensors"))[0]
    header, data = split(shard)
    a, b = first_two(header)
    index_path = folder / "model.safetensors.index.json"
    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif how == "not-json":
        raw = shard.read_bytes()
        shard.write_bytes(raw[:8] + b"\x00{not json" + raw[18:])
    elif how == "length-past-end":
        shard.write_bytes(struct.pack("<Q", shard.stat().st_size + 10) + shard.read_bytes()[8:])
    elif how == "overlap":
        begin, end = header[a]["data_offsets"]
        header[b]["data_offsets"] = [begin, begin + header[b]["data_offsets"][1] - header[b]["data_offsets"][0]]
        join(shard, header, data)
    elif how == "reversed":
        header[a]["data_offsets"] = header[a]["data_offsets"][::-1]
        join(shard, header, data)
    elif how == "size":
        header[a]["shape"] = [d + 1 for d in header[a]["shape"]]
        join(shard, header, data)
    elif how == "dtype":
        header[a]["dtype"] = "F33"
        join(shard, header, data)
    elif how in ("dotdot", "absolute", "missing", "absent-tensor"):
        index = json.loads(index_path.read_text())
        name = next(iter(index["weight_map"]))
        index["weight_map"][name] = {"dotdot": "../../x.safetensors", "absolute": "/tmp/x.safetensors",
                                     "missing": "model-00009-of-00009.safetensors",
                                     "absent-tensor": sorted(set(index["weight_map"].values()))[-1]}[how]
        if how == "absent-tensor":
            index["weight_map"][name] = next(f for f in sorted(set(index["weight_map"].values()))
                                             if name not in split(folder / f)[0])
        index_path.write_text(json.dumps(index))
    elif how == "two-shards":
        other = sorted(folder.glob("*.safetensors"))[1]
        other_header, other_data = split(other)
        header[a] = dict(other_header[first_two(other_header)[0]])  # rename: the other shard's first tensor
        header[first_two(other_header)[0]] = header.pop(a)
        join(shard, header, data)
    elif how in ("bert", "auto-map"):
        config = json.loads((folder / "config.json").read_text())
        config["model_type"] = "bert" if how == "bert" else "my_own_model"
        if how == "auto-map":
            config["auto_map"] = {"AutoConfig": "configuration_mine.MyConfig"}
        (folder / "config.json").write_text(json.dumps(config))


EXPECTED = {
    "truncated": "ends past the end of the file", "not-json": "corrupt safetensors header",
    "length-past-end": "header length", "overlap": "overlap", "reversed": "reversed data_offsets",
    "size": "needs", "dtype": "unknown dtype", "dotdot": "not a plain *.safetensors file name",
    "absolute": "not a plain *.safetensors file name", "missing": "missing", "absent-tensor": "does not hold it",
    "two-shards": "stored in two shards", "bert": "is not supported (supported: llama",
    "auto-map": "remote code (auto_map)",
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny.make_model("llama", tmp_path_factory.mktemp("corrupt") / "llama", layers=2)


@pytest.fixture()
def repo(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    for name in PIPELINE_FILES:
        shutil.copy(REPO / name, root / name)
    return root


# ---------------------------------------------------------------- use


@pytest.mark.parametrize("how", sorted(EXPECTED))
def test_use_refuses_a_damaged_folder_and_writes_nothing(model, repo, tmp_path, monkeypatch, capsys, how):
    from stages.use import app

    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    corrupt(folder, how)
    before = {name: (repo / name).read_bytes() for name in PIPELINE_FILES}
    monkeypatch.chdir(repo)
    code, err = invoke(app, [str(folder)], capsys)
    assert code == 2 and EXPECTED[how] in error_line(err), err
    assert {name: (repo / name).read_bytes() for name in PIPELINE_FILES} == before
    assert sorted(p.name for p in repo.iterdir()) == sorted(PIPELINE_FILES)


def test_use_of_a_hub_model_restores_everything_when_the_download_is_unsupported(model, repo, monkeypatch):
    """A hub id or GGUF is known only after ``dvc repro base``: the same checks then, and every file put back."""
    from stages import use

    before = {name: (repo / name).read_bytes() for name in PIPELINE_FILES}
    restored = []

    def repro(root):  # what `dvc repro base` would leave: a downloaded folder of an unsupported type
        shutil.copytree(model, root / "models" / "base")
        corrupt(root / "models" / "base", "bert")

    monkeypatch.chdir(repo)
    with pytest.raises(use.UserError, match="model type 'bert' is not supported"):
        use.use("someone/model", repro=repro, restore=restored.append)
    assert {name: (repo / name).read_bytes() for name in PIPELINE_FILES} == before and restored == [repo]


def test_use_still_takes_a_sound_folder(model, repo, monkeypatch, capsys):
    from stages.use import app

    monkeypatch.chdir(repo)
    code, err = invoke(app, [str(model)], capsys)
    assert code == 0, err


# ---------------------------------------------------------------- ablate


@pytest.fixture(scope="module")
def planned(model, tmp_path_factory):
    """``(work folder, shard file name, plan file)`` of the shard holding layer 1's writers."""
    work = tmp_path_factory.mktemp("planned")
    plan_and_ablate(model, work, layers="0-1", measurement="1")
    shards = yaml.safe_load((work / "model.yaml").read_text())["shards"]
    key = next(k for k in shards if json.loads((work / "plan" / f"{k}.json").read_text())["edits"])
    return work, shards[key], work / "plan" / f"{key}.json"


def _ablate(base_shard, plan, out, capsys):
    from stages.ablate import app

    return invoke(app, ["--base", base_shard, "--plan", plan, "--out", out], capsys)


@pytest.mark.parametrize("how", ["overlap", "reversed", "truncated", "size"])
def test_ablate_refuses_a_damaged_shard(model, planned, tmp_path, capsys, how):
    work, name, plan = planned
    folder = tmp_path / "base"
    shutil.copytree(model, folder)
    if sorted(folder.glob("*.safetensors"))[0].name != name:  # corrupt() damages the first shard: make it ours
        for other in folder.glob("*.safetensors"):
            if other.name != name:
                other.unlink()
    corrupt(folder, how)
    out = tmp_path / "out"
    code, err = _ablate(folder / name, plan, out / name, capsys)
    assert code == 2 and EXPECTED[how] in error_line(err)
    assert not out.exists() or tree(out) == []


def _edited_writer(plan) -> str:
    return next(e["tensor"] for e in json.loads(plan.read_text())["edits"] if e["layout"] == "columns")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_ablate_names_a_tensor_holding_nan_or_inf(model, planned, tmp_path, capsys, value):
    from abliterate.formats.safetensors_io import read_header

    work, name, plan = planned
    shard = tmp_path / "base" / name
    shard.parent.mkdir()
    shutil.copy(model / name, shard)
    tensor = _edited_writer(plan)
    info = read_header(shard).tensors[tensor]
    data = bytearray(shard.read_bytes())
    data[info.begin + 4 * 7: info.begin + 4 * 8] = struct.pack("<f", float(value))  # one F32 value
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    code, err = _ablate(shard, plan, out / name, capsys)
    line = error_line(err)
    assert code == 2 and f"tensor {tensor} of the base model holds NaN or infinite values" in line
    assert tree(out) == []


def test_a_full_disk_is_one_line_and_leaves_nothing(model, planned, tmp_path, capsys, monkeypatch):
    from abliterate.formats import safetensors_io

    work, name, plan = planned

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors_io, "write_at", full)
    monkeypatch.setattr(safetensors_io, "copy_range", full)
    out = tmp_path / "out"
    code, err = _ablate(model / name, plan, out / name, capsys)
    line = error_line(err)
    assert code == 2 and "No space left on device" in line and "free some space" in line and str(out / name) in line
    assert tree(out) == []


def test_a_full_disk_during_capture_is_one_line_and_leaves_nothing(model, tmp_path, capsys, monkeypatch):
    """capture's scratch files (as large as its output) on a full disk."""
    from abliterate.formats import activations
    from measure_helpers import HARMLESS, write_lines
    from stages.capture import app

    class Full:
        name = "scratch"
        closed = False

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            self.closed = True

    monkeypatch.setattr(activations, "open", lambda *args, **kwargs: Full(), raising=False)
    prompts = write_lines(tmp_path / "p.txt", HARMLESS[:2])
    out = tmp_path / "out"
    code, err = invoke(app, ["--model", model, "--prompts", prompts, "--out", out / "a.parquet"], capsys)
    line = error_line(err)
    assert code == 2 and "cannot write" in line and "No space left on device" in line
    assert tree(out) == []


def test_a_read_only_output_folder_is_one_line(model, planned, tmp_path, capsys, monkeypatch):
    work, name, plan = planned
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: refuse to create files there, as a read-only folder would
        real_open = os.open

        def denied(path, flags, *args, **kwargs):
            if flags & os.O_CREAT and os.path.dirname(os.fspath(path)) == str(out):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", denied)
    try:
        code, err = _ablate(model / name, plan, out / name, capsys)
    finally:
        out.chmod(0o755)
    line = error_line(err)
    assert code == 2 and "Permission denied" in line and "make the folder writable" in line
    assert tree(out) == []


def test_ctrl_c_leaves_no_temporary_file_and_a_new_run_removes_stale_ones(model, planned, tmp_path, monkeypatch):
    from abliterate.formats import safetensors_io
    from abliterate.formats.plans import load_shard_plan
    from abliterate.shard_edit import ablate_shard

    work, name, plan = planned
    out = tmp_path / "out"
    original = safetensors_io.copy_range

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors_io, "copy_range", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ablate_shard(model / name, load_shard_plan(plan), out / name)
    assert tree(out) == []
    monkeypatch.setattr(safetensors_io, "copy_range", original)
    stale = [out / f".{name}.abcd_123.tmp", out / f".{name}.x9y8z7w6.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    keep = out / f".other.{name}.abcd_123.tmp"  # another output's temporary file: not ours to remove
    keep.write_bytes(b"x")
    ablate_shard(model / name, load_shard_plan(plan), out / name)
    assert sorted(p.name for p in out.iterdir()) == sorted([name, keep.name])
    assert (out / name).read_bytes() == (work / "model" / name).read_bytes()


SLOW_ABLATE = """
import sys, time
from abliterate.formats import safetensors_io
original = safetensors_io.copy_range
def slow(*args):
    time.sleep(0.5)
    return original(*args)
safetensors_io.copy_range = slow
from pathlib import Path
from stages.ablate import main
from stages.cliutil import run_guarded
run_guarded(lambda: main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
"""


def test_sigterm_leaves_no_temporary_file(model, planned, tmp_path):
    work, name, plan = planned
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_ABLATE, str(model / name), str(plan), str(out / name)],
                            env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not list(out.glob(".*.tmp")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert list(out.glob(".*.tmp")), "the temporary file never appeared"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and error_line(err) == "error: interrupted"
    assert tree(out) == []


# ---------------------------------------------------------------- reduce's hint for NaN activations


@pytest.fixture(scope="module")
def nan_capture(model, tmp_path_factory):
    """Activations captured in float32 from a model whose layer 1 writer holds a NaN."""
    from abliterate.formats.safetensors_io import read_header
    from abliterate.model.capture import capture
    from measure_helpers import HARMLESS, write_lines

    root = tmp_path_factory.mktemp("nan")
    broken = root / "model"
    shutil.copytree(model, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    tensor = "model.layers.1.mlp.down_proj.weight"
    shard = broken / index["weight_map"][tensor]
    info = read_header(shard).tensors[tensor]
    data = bytearray(shard.read_bytes())
    data[info.begin: info.begin + 4] = struct.pack("<f", float("nan"))
    shard.write_bytes(bytes(data))
    out = root / "acts.parquet"
    capture(broken, str(write_lines(root / "p.txt", HARMLESS[:4])), out, dtype="float32")
    return out


def test_reduce_blames_the_weights_when_captured_in_float32(nan_capture, tmp_path, capsys):
    from stages.reduce import app

    code, err = invoke(app, ["--harmful", nan_capture, "--harmless", nan_capture, "--out", tmp_path / "d"], capsys)
    line = error_line(err)
    assert code == 2 and "decoder layer 1" in line and "weights" in line and "--dtype float32" not in line


def test_reduce_suggests_float32_after_a_16_bit_capture(nan_capture, tmp_path, capsys):
    import pyarrow.parquet as pq

    from stages.reduce import app

    table = pq.read_table(nan_capture)
    meta = dict(table.schema.metadata)
    meta[b"dtype"] = b"bfloat16"
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "bf16.parquet")
    code, err = invoke(app, ["--harmful", tmp_path / "bf16.parquet", "--harmless", tmp_path / "bf16.parquet",
                             "--out", tmp_path / "d"], capsys)
    line = error_line(err)
    assert code == 2 and "capture again with --dtype float32" in line and "decoder layer 1" in line


# ---------------------------------------------------------------- fuzz: the header reader


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
COUNT = st.integers(-3, 300) | st.sampled_from([2**63, 2**64 + 1]) | JSON
ENTRY = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "BF16", "F16", "F64", "I8", "U8", "BOOL", "F4", "F6_E2M3", "F8_E4M3", "F33", ""])
    | JSON,
    "shape": st.lists(COUNT, max_size=3) | JSON,
    "data_offsets": st.lists(COUNT, min_size=0, max_size=3) | JSON,
}) | JSON
HEADER = st.dictionaries(st.text(max_size=6) | st.just("__metadata__"), ENTRY, max_size=5)


def _read(path, content: bytes):
    """read_header on ``content``: the header, or None after a one-line UserError; anything else fails."""
    from abliterate.errors import UserError
    from abliterate.formats.safetensors_io import read_header

    path.write_bytes(content)
    try:
        header = read_header(path)
    except UserError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return None
    # what it accepts is sound: every tensor inside the data area, sized by dtype and shape, no overlap
    spans = sorted((t.begin, t.end) for t in header.tensors.values() if t.end > t.begin)
    assert all(header.data_start <= t.begin <= t.end <= header.size for t in header.tensors.values())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    return header


@FUZZ
@given(content=st.binary(max_size=300))
def test_fuzz_random_bytes(tmp_path, content):
    _read(tmp_path / "f.safetensors", content)


@FUZZ
@given(body=st.binary(max_size=200), extra=st.integers(-20, 20), data=st.binary(max_size=64))
def test_fuzz_random_header_bytes_and_lengths(tmp_path, body, extra, data):
    length = max(0, len(body) + extra)
    _read(tmp_path / "f.safetensors", struct.pack("<Q", length) + body + data)


@FUZZ
@given(header=HEADER, data=st.binary(max_size=400))
def test_fuzz_structured_headers(tmp_path, header, data):
    text = json.dumps(header).encode()
    _read(tmp_path / "f.safetensors", struct.pack("<Q", len(text)) + text + data)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.sampled_from(["set", "cut", "put"])),
                      min_size=1, max_size=4))
def test_fuzz_mutated_real_shard(model, tmp_path, edits):
    """A real shard with bytes set, cut or inserted in its length field or header."""
    raw = bytearray(sorted(model.glob("*.safetensors"))[0].read_bytes())
    (length,) = struct.unpack("<Q", bytes(raw[:8]))
    for at, value, how in edits:
        at %= 8 + length
        if how == "set":
            raw[at] = value
        elif how == "cut":
            del raw[at]
        else:
            raw.insert(at, value)
    _read(tmp_path / "f.safetensors", bytes(raw))


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a": ' * 50_000, b"\xff\xfe{}", b"null", b"[]", b'"x"', b"1e999",
                                  b'{"__metadata__": {"a": 1}}', b'{"t": {"dtype": "F32", "shape": [true],'
                                  b' "data_offsets": [0, 4]}}'])
def test_hostile_headers_are_one_line(tmp_path, body):
    assert _read(tmp_path / "f.safetensors", struct.pack("<Q", len(body)) + body + b"\0" * 8) is None
