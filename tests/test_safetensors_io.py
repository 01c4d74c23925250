"""Streamed safetensors reading and patching."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from abliterate.formats import safetensors_io as sio
from abliterate.errors import UserError


@pytest.fixture()
def shard(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(33, 17, generator=gen),
        "b.bf16": torch.randn(4, 5, 64, generator=gen).to(torch.bfloat16),
        "c.f16": torch.randn(64, generator=gen).to(torch.float16),
        "d.int": torch.arange(10, dtype=torch.int64),
    }
    path = tmp_path / "shard.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "kept"})
    return path, tensors


def test_header_matches_the_library(shard):
    path, tensors = shard
    header = sio.read_header(path)
    assert header.metadata == {"format": "pt", "note": "kept"}
    assert set(header.tensors) == set(tensors)
    with safe_open(str(path), framework="pt") as handle:
        for name in tensors:
            assert list(handle.get_slice(name).get_shape()) == list(header.tensors[name].shape)


@pytest.mark.parametrize("name", ["a.weight", "b.bf16", "c.f16"])
def test_row_chunks_read_back_the_tensor(shard, name):
    path, tensors = shard
    info = sio.read_header(path).tensors[name]
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = [sio.read_rows(fd, info, a, b) for a, b in sio.row_chunks(info, chunk_elements=100)]
    finally:
        os.close(fd)
    assert len(parts) > 1 or info.numel <= 100
    expected = tensors[name].reshape(-1, tensors[name].shape[-1])
    assert torch.equal(torch.from_numpy(np.concatenate(parts)), expected.float())


def test_patch_copy_without_producers_is_a_byte_copy(shard, tmp_path):
    path, _ = shard
    out = tmp_path / "copy.safetensors"
    sio.patch_copy(path, out, {})
    assert out.read_bytes() == path.read_bytes()


def test_patch_copy_rewrites_only_the_produced_range(shard, tmp_path, monkeypatch):
    path, tensors = shard
    monkeypatch.setattr(sio, "CHUNK_ELEMENTS", 64)  # many chunks

    def negate(fd, info, write):
        for a, b in sio.row_chunks(info, chunk_elements=64):
            write(-sio.read_rows(fd, info, a, b), a)

    out = tmp_path / "patched.safetensors"
    sio.patch_copy(path, out, {"b.bf16": negate})
    info = sio.read_header(path).tensors["b.bf16"]
    old, new = path.read_bytes(), out.read_bytes()
    assert len(old) == len(new)
    assert old[: info.begin] == new[: info.begin] and old[info.end:] == new[info.end:]
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "kept"}
        assert torch.equal(handle.get_tensor("b.bf16"), -tensors["b.bf16"])
        assert torch.equal(handle.get_tensor("a.weight"), tensors["a.weight"])


def test_bf16_rounding_matches_torch():
    values = torch.randn(4096, dtype=torch.float32) * torch.logspace(-30, 30, 4096)
    values[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    ours = sio.encode(values.numpy(), "BF16")
    theirs = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours[1:], theirs[1:]) and np.isnan(sio.decode(ours[:1], "BF16")).all()
    assert np.array_equal(sio.decode(theirs, "BF16"), values.to(torch.bfloat16).float().numpy(), equal_nan=True)


def test_kernel_copy_failure_falls_back_to_read_write(shard, tmp_path, monkeypatch):
    path, _ = shard

    def broken(*args, **kwargs):
        raise OSError(18, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", broken, raising=False)
    out = tmp_path / "fallback.safetensors"
    sio.patch_copy(path, out, {})
    assert out.read_bytes() == path.read_bytes()


def test_a_producer_that_writes_too_little_is_an_error(shard, tmp_path):
    path, _ = shard
    with pytest.raises(ValueError, match="bytes written"):
        sio.patch_copy(path, tmp_path / "x.safetensors", {"a.weight": lambda fd, info, write: None})


def test_errors_on_either_side_of_the_writer_end_the_copy(shard, tmp_path, monkeypatch):
    """A producer failing mid-tensor, or the writer failing (a full disk), raises; nothing hangs
    even with the chunk queue full (the producers stop when the writer does)."""
    path, _ = shard
    monkeypatch.setattr(sio, "QUEUE_CHUNKS", 1)
    monkeypatch.setattr(sio, "COPY_PIECE", 16)  # many gap pieces between the chunks

    def rows(fail_at=None):
        def produce(fd, info, write):
            for a, b in sio.row_chunks(info, chunk_elements=8):
                if a == fail_at:
                    raise RuntimeError("producer failed")
                write(sio.read_rows(fd, info, a, b), a)
        return produce

    with pytest.raises(RuntimeError, match="producer failed"):
        sio.patch_copy(path, tmp_path / "x.safetensors", {"a.weight": rows(), "b.bf16": rows(fail_at=3)})
    calls = [0]
    real = sio.write_at

    def full_disk(fd, data, offset):
        calls[0] += 1
        if calls[0] > 2:
            raise OSError(28, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(sio, "write_at", full_disk)
    with pytest.raises(OSError, match="No space left"):
        sio.patch_copy(path, tmp_path / "y.safetensors", {"a.weight": rows(), "b.bf16": rows(), "c.f16": rows()})
    monkeypatch.setattr(sio, "write_at", real)
    sio.patch_copy(path, tmp_path / "z.safetensors", {"a.weight": rows(), "b.bf16": rows(), "c.f16": rows()})
    assert (tmp_path / "z.safetensors").read_bytes() == path.read_bytes()  # read back unchanged: a copy


def test_direct_options_take_exactly_the_named_options():
    from stages.cliutil import direct_options

    names = ("--base", "--plan", "--out")
    assert direct_options(["--plan", "p", "--base", "b", "--out", "o"], names) == {"base": "b", "plan": "p", "out": "o"}
    for argv in (["--help"], ["--base", "b", "--plan", "p"], ["--base", "b", "--plan", "p", "--out", "o", "-v", "x"],
                 ["--base", "b", "--base", "b2", "--out", "o"], ["--base", "--plan", "--out", "o", "--plan", "p"]):
        assert direct_options(argv, names) is None, argv


def test_broken_files_are_user_errors(tmp_path, shard):
    path, _ = shard
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(UserError, match="not a safetensors file"):
        sio.read_header(short)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 5) + b"{oops")
    with pytest.raises(UserError, match="corrupt"):
        sio.read_header(bad)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(UserError, match="truncated"):
        sio.read_header(truncated)
    header = json.loads(path.read_bytes()[8: 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    assert "__metadata__" in header
