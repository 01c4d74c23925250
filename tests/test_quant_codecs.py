"""The quantization codecs: grids against torch's own float8 cast, exact round trips of already
quantized data, per-element error bounds of fresh quantization, and the scale search beating the
max-based scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from abliterate.quant import fp8, mxfp4, nvfp4
from quant_util import grid_step
from abliterate.quant.numerics import (E2M1_VALUES, decode_e2m1, decode_e4m3, encode_e2m1, encode_e4m3, nearest_e2m1,
                                       nearest_e4m3, pack_nibbles, unpack_nibbles)


def test_e4m3_matches_torch():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=gen) * s for s in (1e-3, 0.1, 1.0, 30.0, 200.0)])
    x = torch.cat([x, torch.tensor([0.0, -0.0, 448.0, -448.0, 2.0**-9, 2.0**-10, 3 * 2.0**-11, 0.5 + 2.0**-5])])
    ours = encode_e4m3(x.numpy())
    theirs = x.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(ours, theirs)
    codes = np.array([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=np.uint8)
    want = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(decode_e4m3(codes), want)
    assert np.array_equal(encode_e4m3(decode_e4m3(codes)), codes)
    assert encode_e4m3(np.array([1000.0, -500.0], np.float32)).tolist() == [0x7E, 0xFE]  # saturates


def test_e2m1_grid_ties_and_packing():
    codes = np.arange(16, dtype=np.uint8)
    values = decode_e2m1(codes)
    assert values[:8].tolist() == list(E2M1_VALUES) and (values[9:] == -values[1:8]).all()
    assert np.array_equal(encode_e2m1(values), np.where(codes == 8, 8, codes))  # -0.0 keeps its sign
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -5.0], np.float32)
    assert decode_e2m1(encode_e2m1(ties)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -4.0]
    gen = np.random.default_rng(0)
    x = gen.uniform(-6, 6, 5000).astype(np.float32)
    grid = np.array(E2M1_VALUES)
    nearest = np.abs(np.abs(x)[:, None] - grid[None]).min(1)
    assert np.allclose(np.abs(np.abs(decode_e2m1(encode_e2m1(x))) - np.abs(x)), nearest)
    packed = gen.integers(0, 256, (3, 8), dtype=np.uint8)
    assert np.array_equal(pack_nibbles(unpack_nibbles(packed)), packed)
    assert unpack_nibbles(np.array([0x21], np.uint8)).tolist() == [1, 2]  # even element in the low nibble


@pytest.mark.parametrize("nearest,encode,decode,top", [(nearest_e4m3, encode_e4m3, decode_e4m3, 480.0),
                                                    (nearest_e2m1, encode_e2m1, decode_e2m1, 8.0)])
def test_nearest_is_the_codec_round_trip(nearest, encode, decode, top):
    """The scale search rounds magnitudes without codes: the nearest grid value, a tie to the even code
    (found here by brute force), which is also what encoding then decoding gives; ties, subnormals,
    binade edges and saturation included."""
    gen = np.random.default_rng(1)
    grid = np.abs(decode(np.arange(0x7F if top > 8 else 8, dtype=np.uint8)))  # magnitudes by code
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties
    near = np.concatenate([np.nextafter(mids, 0), np.nextafter(mids, np.inf), np.nextafter(grid, 0)])
    x = np.concatenate([grid, mids, near, gen.uniform(0, top, 20000), np.exp(gen.uniform(-25, np.log(top), 20000)),
                        [0.0, top]]).astype(np.float32)
    dist = np.abs(x.astype(np.float64)[:, None] - grid[None, :])
    ties = dist == dist.min(axis=1, keepdims=True)
    even = ties & (np.arange(grid.size) % 2 == 0)[None, :]
    want = grid[np.where(even.any(axis=1), even.argmax(axis=1), ties.argmax(axis=1))]
    assert np.array_equal(nearest(x.copy()), want)
    assert np.array_equal(np.abs(decode(encode(x))), want)
    assert np.array_equal(encode(-x) >> (7 if top > 8 else 3), np.ones(x.size, np.uint8))  # the sign bit


def _weights(rows, cols, seed=0):
    gen = np.random.default_rng(seed)
    w = gen.standard_normal((rows, cols)).astype(np.float32) * 0.05
    w[gen.random((rows, cols)) < 0.01] *= 20  # outliers, so blocks differ in range
    return w


@pytest.mark.parametrize("shape,scale_shape,block", [((300, 200), (3, 2), (128, 128)), ((256, 256), (2, 2), (128, 128)),
                                                     ((64, 96), (), None), ((64, 96), (64, 1), None)])
def test_fp8_round_trip_and_bounds(shape, scale_shape, block):
    grid, blk = fp8.grid_of(*shape, scale_shape, block)
    w = _weights(*shape)
    codes, scales = fp8.quantize(w, grid, blk)
    back = fp8.dequantize(codes, scales, grid, blk)
    # fresh quantization: every element within one grid step of its value (clipping included)
    per_element = np.repeat(np.repeat(scales, blk[0], 0)[: shape[0]], blk[1], 1)[:, : shape[1]]
    assert (np.abs(back - w) <= grid_step(w, per_element, "e4m3")).all()
    # already quantized data with its scales as the hint: the very same bytes come back
    again_codes, again_scales = fp8.quantize(back, grid, blk, hint=scales)
    assert np.array_equal(again_codes, codes) and np.array_equal(again_scales, scales)
    # the search is never worse than the max-based scale alone
    amax = np.abs(fp8._blocks(w, grid, blk)).max(-1)
    plain = np.where(amax > 0, amax / 448, 1).astype(np.float32)
    plain_codes = fp8._unblocks(encode_e4m3(fp8._blocks(w, grid, blk) / plain[..., None]), grid, blk, w.shape)
    plain_err = np.square(fp8.dequantize(plain_codes, plain, grid, blk) - w).sum()
    assert np.square(back - w).sum() <= plain_err


def test_fp8_block_grid_rejects_mismatch():
    assert fp8.grid_of(300, 200, (2, 2), (128, 128)) is None
    assert fp8.grid_of(300, 200, (3, 2), (128, 128)) == ((3, 2), (128, 128))


def test_mxfp4_round_trip_and_bounds():
    gen = np.random.default_rng(1)
    blocks = gen.integers(0, 256, (2, 8, 3, 16), dtype=np.uint8)
    scales = gen.integers(110, 130, (2, 8, 3), dtype=np.uint8)
    values = mxfp4.dequantize(blocks, scales)
    assert values.shape == (2, 8, 96)
    lut = np.array(E2M1_VALUES + tuple(-v for v in E2M1_VALUES))  # the rule, written out independently
    want = np.stack([lut[blocks & 15], lut[blocks >> 4]], -1).reshape(2, 8, 3, 32) * 2.0 ** (scales[..., None] - 127.0)
    assert np.array_equal(values, want.reshape(2, 8, 96).astype(np.float32))
    again_blocks, again_scales = mxfp4.quantize(values, hint=scales)
    assert np.array_equal(mxfp4.dequantize(again_blocks, again_scales), values)
    assert np.array_equal(again_blocks, blocks) and np.array_equal(again_scales, scales)
    w = _weights(16, 96)
    q_blocks, q_scales = mxfp4.quantize(w)
    back = mxfp4.dequantize(q_blocks, q_scales)
    scale = mxfp4.exponent_scale(q_scales).repeat(32, axis=-1)
    assert (np.abs(back - w) <= grid_step(w, scale, "e2m1")).all()
    top = np.ceil(np.log2(np.abs(w.reshape(16, 3, 32)).max(-1) / 6)) + 127
    plain = mxfp4.dequantize(*_mx_plain(w, top))
    assert np.square(back - w).sum() <= np.square(plain - w).sum()


def _mx_plain(w, exponents):
    blocks = w.reshape(*w.shape[:-1], -1, 32) / mxfp4.exponent_scale(exponents)[..., None]
    return pack_nibbles(encode_e2m1(blocks)), exponents.astype(np.uint8)


def test_nvfp4_round_trip_and_bounds():
    gen = np.random.default_rng(2)
    packed = gen.integers(0, 256, (8, 32), dtype=np.uint8)
    scale_codes = encode_e4m3(gen.uniform(1, 300, (8, 4)).astype(np.float32))
    values = nvfp4.dequantize(packed, scale_codes, 1e-3)
    assert values.shape == (8, 64)
    again = nvfp4.quantize(values, scale_codes, 1e-3)
    assert np.array_equal(again[0], packed) and np.array_equal(again[1], scale_codes) and again[2] == np.float32(1e-3)
    w = _weights(32, 128)
    q, codes, scale_2 = nvfp4.quantize(w)
    back = nvfp4.dequantize(q, codes, scale_2)
    block = (decode_e4m3(codes) * np.float32(scale_2)).repeat(16, axis=-1)
    assert (np.abs(back - w) <= grid_step(w, block, "e2m1")).all()
    assert np.square(back - w).sum() < 0.02 * np.square(w).sum()


def test_banded_search_gives_the_same_bytes(monkeypatch):
    from abliterate.quant import numerics

    w = _weights(300, 200)
    grid, blk = fp8.grid_of(300, 200, (3, 2), (128, 128))
    whole = fp8.quantize(w, grid, blk), mxfp4.quantize(w[:, :192]), nvfp4.quantize(w[:, :192])
    monkeypatch.setattr(numerics, "BLOCKS_AT_ONCE", 100)
    monkeypatch.setattr(fp8, "BAND", 100)
    banded = fp8.quantize(w, grid, blk), mxfp4.quantize(w[:, :192]), nvfp4.quantize(w[:, :192])
    for a, b in zip(whole, banded):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert np.array_equal(fp8.dequantize(*whole[0], grid, blk), fp8.dequantize(*banded[0], grid, blk))
