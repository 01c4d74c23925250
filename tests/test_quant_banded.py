"""A block-scaled FP8 writer edited a band of columns at a time gives the bytes the whole tensor
edited at once gives (codes and scales), steered or not, with one edit or two."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from abliterate.formats.safetensors_io import read_header
from abliterate.quant import banded, fp8, steer
from abliterate.quant.rewrite import edit_piece
from abliterate.records import Edit

RECORD = {"format": "fp8-block", "weight": "w", "scale": "w_scale_inv", "block": [16, 16]}


def _writer(path, rows: int, cols: int) -> dict:
    gen = np.random.default_rng(0)
    w = (gen.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    w[gen.random((rows, cols)) < 0.01] *= 20  # outliers: blocks of different ranges
    grid, block = fp8.grid_of(rows, cols, (-(-rows // 16), -(-cols // 16)), (16, 16))
    codes, scales = fp8.quantize(w, grid, block)
    save_file({"w": torch.from_numpy(codes).view(torch.float8_e4m3fn), "w_scale_inv": torch.from_numpy(scales)},
              str(path))
    return read_header(path).tensors


def _edit(u, norm_preserve: bool, scale: float = 1.0) -> Edit:
    return Edit(tensor="w", file="f", role="o_proj", layer=0, layout="columns", bias=False, norm_preserve=norm_preserve,
                scale=scale, measurement=0, sparsity=0.0, projected=False, direction=u, vector=u, gain=None,
                gain_offset=0.0, dtype="F8_E4M3", shape=(64, 200), storage=RECORD)


@pytest.mark.parametrize("count,norm_preserve,steered", [(1, True, True), (1, False, True), (2, True, False)])
def test_banded_edit_gives_the_whole_tensor_bytes(count, norm_preserve, steered, tmp_path, monkeypatch):
    tensors = _writer(tmp_path / "w.safetensors", 64, 200)  # 200 columns: the last block is partial
    gen = np.random.default_rng(1)
    edits = []
    for t in range(count):
        u = gen.standard_normal(64)
        edits.append(_edit(u / np.linalg.norm(u), norm_preserve, 1.0 if t == 0 else 0.5))
    monkeypatch.setattr(steer, "slice_width", lambda hidden: 8)  # slices of 8 columns, as on a wide writer
    fd = os.open(tmp_path / "w.safetensors", os.O_RDONLY)
    try:
        monkeypatch.setattr(banded, "BAND_ELEMENTS", 1 << 40)
        assert not banded.applies(RECORD, tensors, "columns")
        whole = edit_piece(fd, RECORD, tensors, 0, edits, steer=steered)
        monkeypatch.setattr(banded, "BAND_ELEMENTS", 64 * 32)  # bands of 32 columns: 7 bands
        assert banded.applies(RECORD, tensors, "columns") and banded.band_width(64, 200, 16) == 32
        bands = edit_piece(fd, RECORD, tensors, 0, edits, steer=steered)
    finally:
        os.close(fd)
    assert np.array_equal(bands["weight"], whole["weight"])
    assert np.array_equal(bands["scale"], whole["scale"])
    old = fp8.dequantize(*_stored(tmp_path / "w.safetensors"), *whole["grid"])
    new = fp8.dequantize(bands["weight"], bands["scale"].view(np.float32), *whole["grid"])
    assert not np.array_equal(old, new)  # the edit did something


def _stored(path):
    tensors = read_header(path).tensors
    with open(path, "rb") as f:
        data = f.read()
    w, s = tensors["w"], tensors["w_scale_inv"]
    codes = np.frombuffer(data[w.begin:w.begin + w.nbytes], np.uint8).reshape(w.shape)
    scales = np.frombuffer(data[s.begin:s.begin + s.nbytes], np.float32).reshape(s.shape)
    return codes, scales
