"""Layer-streamed capture: the same activations as the in-memory forward on every family, with one
decoder layer in memory at a time, each layer's weights read once per pass, and nothing left behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests import tiny
from tests.measure_helpers import HARMFUL, HARMLESS, error_line, invoke, write_lines


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    # varied lengths, so that batches need padding and several batches run
    lines = HARMFUL + HARMLESS[:3] + ["Hi", "A much longer prompt that goes on and on about nothing in particular at all."]
    return write_lines(tmp_path_factory.mktemp("prompts") / "mixed.txt", lines)


def activations(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """(keys [N, 3]: prompt, position, layer; acts [N, H]) sorted by key."""
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    keys = np.stack([table.column(c).to_numpy() for c in ("prompt", "position", "layer")], axis=1)
    hidden = table.schema.field("activation").type.list_size
    acts = table.column("activation").combine_chunks().flatten().to_numpy().reshape(-1, hidden)
    order = np.lexsort(keys.T[::-1])
    return keys[order], acts[order]


def capture(model: Path, prompts: Path, out: Path, streaming: str, **options) -> dict:
    from abliterate.model.capture import capture as run
    from abliterate.progress import Silent

    return run(model, str(prompts), out, batch_size=4, positions="-1,-3", streaming=streaming, report=Silent(),
               **options)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_streamed_capture_equals_in_memory(prompt_file, tmp_path, family):
    model = tiny.make_model(family, tmp_path / "model", layers=3)
    loaded = capture(model, prompt_file, tmp_path / "loaded.parquet", "off")
    streamed = capture(model, prompt_file, tmp_path / "streamed.parquet", "on")
    assert (loaded["streamed"], streamed["streamed"]) == (False, True)
    keys_a, a = activations(tmp_path / "loaded.parquet")
    keys_b, b = activations(tmp_path / "streamed.parquet")
    assert np.array_equal(keys_a, keys_b) and len(set(keys_a[:, 2])) == 4  # L + 1 residual indices
    scale = np.abs(a).max(axis=1, keepdims=True)
    assert np.all(np.abs(a - b) <= 1e-4 * scale)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".abliterate-stream")] == []  # scratch removed


def test_a_16_bit_checkpoint_streams_in_float32(prompt_file, tmp_path):
    model = tiny.make_model("llama", tmp_path / "model", layers=2, dtype="bfloat16")
    capture(model, prompt_file, tmp_path / "loaded.parquet", "off")
    capture(model, prompt_file, tmp_path / "streamed.parquet", "on")
    _, a = activations(tmp_path / "loaded.parquet")
    _, b = activations(tmp_path / "streamed.parquet")
    assert np.all(np.abs(a - b) <= 1e-4 * np.abs(a).max(axis=1, keepdims=True))


def test_one_layer_in_memory_and_each_read_once_per_pass(prompt_file, tmp_path, monkeypatch):
    from abliterate.model import streaming

    model = tiny.make_model("qwen3_moe", tmp_path / "model", layers=4)
    seen = {"reads": [], "most": 0}
    original = streaming.Streamed.materialize

    def counting(self, i):
        seen["reads"].append(i)
        original(self, i)
        live = [k for k, layer in enumerate(self.layers) if any(p.device.type != "meta" for p in layer.parameters())]
        seen["most"] = max(seen["most"], len(live))

    monkeypatch.setattr(streaming.Streamed, "materialize", counting)
    capture(model, prompt_file, tmp_path / "streamed.parquet", "on")
    assert seen["reads"] == [0, 1, 2, 3]  # several batches, yet every layer read once
    assert seen["most"] == 1


def test_auto_streams_only_when_the_model_does_not_fit(tmp_path):
    from abliterate.model.streaming import compute_bytes, should_stream, weights_bytes

    model = tiny.make_model("llama", tmp_path / "bf16", layers=2, dtype="bfloat16")
    stored = weights_bytes(model)
    assert compute_bytes(model, "float32") == 2 * stored  # a 16-bit checkpoint doubles in float32
    assert compute_bytes(model, "bfloat16") == stored
    assert should_stream("auto", model, "float32", "cpu", free=2 * stored) is True  # no room for the margin
    assert should_stream("auto", model, "float32", "cpu", free=3 * stored) is False
    assert should_stream("auto", model, "bfloat16", "cpu", free=2 * stored) is False
    assert should_stream("on", model, "float32", "cpu", free=10**15) is True
    assert should_stream("off", model, "float32", "cpu", free=0) is False


def test_a_bad_streaming_mode_is_one_line(tmp_path, prompt_file, capsys):
    from stages.capture import app

    model = tiny.make_model("llama", tmp_path / "model", layers=1)
    code, err = invoke(app, ["--model", model, "--prompts", prompt_file, "--out", tmp_path / "a.parquet",
                             "--streaming", "maybe"], capsys)
    assert code != 0
    assert error_line(err) == "error: streaming must be one of auto, on, off, got 'maybe'"
    assert not (tmp_path / "a.parquet").exists()
