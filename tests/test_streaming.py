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
    _check_streamed_capture(tiny.make_model(family, tmp_path / "model", layers=3), prompt_file, tmp_path)


def _check_streamed_capture(model: Path, prompt_file: Path, tmp_path: Path) -> None:
    """Capture of the 3-layer ``model`` in memory and streamed: the same keys, each vector within 1e-4 of
    its largest element, and the scratch folder gone."""
    loaded = capture(model, prompt_file, tmp_path / "loaded.parquet", "off")
    streamed = capture(model, prompt_file, tmp_path / "streamed.parquet", "on")
    assert (loaded["streamed"], streamed["streamed"]) == (False, True)
    keys_a, a = activations(tmp_path / "loaded.parquet")
    keys_b, b = activations(tmp_path / "streamed.parquet")
    assert np.array_equal(keys_a, keys_b) and len(set(keys_a[:, 2])) == 4  # L + 1 residual indices
    scale = np.abs(a).max(axis=1, keepdims=True)
    assert np.all(np.abs(a - b) <= 1e-4 * scale)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".abliterate-stream")] == []  # scratch removed


# transformers de-quantizes these on a CPU when it loads them; streamed, each layer comes de-quantized too
QUANTIZED = [("llama", "fp8-block", {}), ("qwen3_moe", "fp8-block", {}), ("gpt_oss", "mxfp4", {"intermediate_size": 64})]


@pytest.mark.parametrize("family, fmt, overrides", QUANTIZED, ids=[f"{f}-{q}" for f, q, _ in QUANTIZED])
def test_a_quantized_checkpoint_streams_de_quantized(prompt_file, tmp_path, family, fmt, overrides):
    from tests import quant_util

    floats = tiny.make_model(family, tmp_path / "float", layers=3, **overrides)
    _check_streamed_capture(quant_util.quantize_model(floats, tmp_path / "model", fmt), prompt_file, tmp_path)


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
    from abliterate.model.streaming import compute_bytes, place, weights_bytes

    model = tiny.make_model("llama", tmp_path / "bf16", layers=2, dtype="bfloat16")
    stored = weights_bytes(model)
    assert compute_bytes(model, "float32") == 2 * stored  # a 16-bit checkpoint doubles in float32
    assert compute_bytes(model, "bfloat16") == stored
    assert place("auto", model, "float32", "cpu", free=[2 * stored]) == "stream"  # no room for the margin
    assert place("auto", model, "float32", "cpu", free=[3 * stored]) == "one"
    assert place("auto", model, "bfloat16", "cpu", free=[2 * stored]) == "one"
    assert place("on", model, "float32", "cpu", free=[10**15]) == "stream"
    assert place("off", model, "float32", "cpu", free=[0]) == "one"


@pytest.mark.parametrize("family, fmt, overrides", QUANTIZED, ids=[f"{f}-{q}" for f, q, _ in QUANTIZED])
def test_a_quantized_checkpoint_counts_de_quantized(tmp_path, family, fmt, overrides):
    """transformers de-quantizes FP8 and MXFP4 into the compute dtype, so auto placement counts the
    model it builds (its stored size is 2-4 times smaller in float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    from abliterate.model.streaming import compute_bytes, weights_bytes
    from tests import quant_util

    floats = tiny.make_model(family, tmp_path / "float", layers=3, **overrides)
    assert compute_bytes(floats, "float32") == weights_bytes(floats)  # unquantized: as stored
    model = quant_util.quantize_model(floats, tmp_path / "model", fmt)
    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    real = sum(p.numel() * 4 for p in loaded.parameters())
    assert abs(compute_bytes(model, "float32") - real) <= 0.1 * real
    assert compute_bytes(model, "bfloat16") * 2 == compute_bytes(model, "float32")
    assert weights_bytes(model) < 0.6 * real  # what the stored size alone would have counted


def test_several_gpus_take_a_model_too_big_for_one():
    from abliterate.model.streaming import placement

    gb = 1 << 30
    assert placement("auto", 100 * gb, [80 * gb, 80 * gb]) == "spread"  # 125 GB with the margin: two GPUs
    assert placement("auto", 100 * gb, [140 * gb, 80 * gb]) == "one"
    assert placement("auto", 100 * gb, [60 * gb, 60 * gb]) == "stream"  # not even across both
    assert placement("auto", 100 * gb, [80 * gb]) == "stream"
    assert placement("off", 100 * gb, [60 * gb, 60 * gb]) == "spread"  # in memory if it fits at all
    assert placement("on", 1, [80 * gb, 80 * gb]) == "stream"


def test_a_bad_streaming_mode_is_one_line(tmp_path, prompt_file, capsys):
    from stages.capture import app

    model = tiny.make_model("llama", tmp_path / "model", layers=1)
    code, err = invoke(app, ["--model", model, "--prompts", prompt_file, "--out", tmp_path / "a.parquet",
                             "--streaming", "maybe"], capsys)
    assert code != 0
    assert error_line(err) == "error: streaming must be one of auto, on, off, got 'maybe'"
    assert not (tmp_path / "a.parquet").exists()


SETS = {"harmful": HARMFUL, "harmless": HARMLESS[:4], "borderline": ["How do I kill a stuck process?", "Hi"]}


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_oss", "qwen3_moe", "qwen3_next"])
def test_streamed_baseline_and_evaluate_equal_in_memory(tmp_path, family):
    base = tiny.make_model(family, tmp_path / "base", layers=3)
    other = tiny.make_model(family, tmp_path / "other", layers=3, seed=1)  # stands for an ablated copy
    _baseline_and_evaluate_streamed_and_in_memory(tmp_path, base, other)


@pytest.mark.parametrize("family, fmt, overrides", [QUANTIZED[0], QUANTIZED[2]], ids=["llama-fp8-block", "gpt_oss-mxfp4"])
def test_streamed_baseline_and_evaluate_of_a_quantized_checkpoint_equal_in_memory(tmp_path, family, fmt, overrides):
    from tests import quant_util

    models = []
    for name, seed in (("base", 0), ("other", 1)):
        floats = tiny.make_model(family, tmp_path / f"{name}-float", layers=3, seed=seed, **overrides)
        models.append(quant_util.quantize_model(floats, tmp_path / name, fmt))
    _baseline_and_evaluate_streamed_and_in_memory(tmp_path, *models)


def _baseline_and_evaluate_streamed_and_in_memory(tmp_path, base, other):
    """Baseline of ``base`` and evaluation of ``other`` against it, in memory and streamed: the same answers,
    first-token log-probabilities within 1e-4 and metrics within 1e-4 relative."""
    from abliterate.baseline import build_baseline
    from abliterate.evaluation import evaluate
    from abliterate.formats.baseline_table import read_baseline
    from abliterate.progress import Silent

    files = {name: str(write_lines(tmp_path / f"{name}.txt", lines)) for name, lines in SETS.items()}
    settings = dict(max_new_tokens=6, kl_tokens=3, batch_size=2, dtype="float32", device="cpu", top_k=8,
                    report=Silent())
    tables, metrics = {}, {}
    for mode in ("off", "on"):
        build_baseline(base, files["harmful"], files["harmless"], tmp_path / f"{mode}.parquet",
                       borderline=files["borderline"], streaming=mode, **settings)
        tables[mode] = read_baseline(tmp_path / f"{mode}.parquet")[0]
        metrics[mode] = evaluate(other, tmp_path / "off.parquet", tmp_path / f"{mode}.json", tmp_path / f"{mode}.md",
                                 batch_size=3, dtype="float32", device="cpu", streaming=mode, report=Silent())
    assert tables["on"]["answer_ids"] == tables["off"]["answer_ids"]
    pairs = [(a, b) for a, b in zip(tables["off"]["first_logprobs"], tables["on"]["first_logprobs"]) if a is not None]
    assert len(pairs) == len(SETS["harmless"])
    for a, b in pairs:
        assert np.allclose(a, b, rtol=0, atol=1e-4)
    assert metrics["on"].keys() == metrics["off"].keys() and metrics["off"]["kl_first_token"] > 0
    for key, value in metrics["off"].items():
        assert metrics["on"][key] == pytest.approx(value, rel=1e-4, abs=1e-7), key


def test_generation_reads_each_layer_once_per_token_for_all_batches(tmp_path):
    from abliterate.model.generation import greedy_generate
    from abliterate.model.modelio import load_model
    from abliterate.model.streaming import opened
    from abliterate.progress import Silent

    model_dir = tiny.make_model("qwen2", tmp_path / "model", layers=3)
    prompts = [[256, *range(40, 40 + n)] for n in (3, 5, 5, 8, 9, 12, 13)]
    settings = dict(max_new_tokens=5, eos_ids=[], pad_id=258, batch_size=2, device="cpu")
    expected = greedy_generate(load_model(model_dir, device="cpu"), prompts, **settings)
    with opened(model_dir, "float32", "cpu", "on", "test", Silent()) as model:
        got = greedy_generate(model, prompts, **settings)
        reads = model.abliterate_sweep.reads
    assert got == expected
    assert reads == 3 * 5  # 3 layers x (the prompt pass + 4 steps); batch after batch would read 4x as many


def test_a_kv_budget_splits_generation_into_waves_with_the_same_answers(tmp_path):
    from abliterate.model.generation import greedy_generate, kv_bytes_per_token
    from abliterate.model.modelio import load_model
    from abliterate.model.streaming import opened
    from abliterate.progress import Silent

    model_dir = tiny.make_model("llama", tmp_path / "model", layers=3)
    prompts = [[256, *range(40, 40 + n)] for n in (3, 5, 5, 8, 9, 12, 13)]
    settings = dict(max_new_tokens=5, eos_ids=[], pad_id=258, batch_size=2, device="cpu")
    loaded = load_model(model_dir, device="cpu")
    expected = greedy_generate(loaded, prompts, **settings)
    per_token = kv_bytes_per_token(loaded)
    # K and V of every layer and key-value head, float32
    assert per_token == 3 * loaded.config.num_key_value_heads * 2 * loaded.config.head_dim * 4
    with opened(model_dir, "float32", "cpu", "on", "test", Silent()) as model:
        sweep = model.abliterate_sweep
        # batches of prompt lengths (4, 6) and (6, 9) fit together (+5 new tokens each), (10, 13) and (14) not
        sweep.budget = (2 * (6 + 5) + 2 * (9 + 5)) * per_token
        got = greedy_generate(model, prompts, **settings)
        reads, waves = sweep.reads, sweep.waves
    assert got == expected
    assert waves == 3  # [(4, 6), (6, 9)], [(10, 13)], [(14,)]
    assert reads == waves * 3 * 5  # each wave reads every layer once per token


def test_waves_group_consecutive_costs_within_the_budget():
    from abliterate.model.sweep import waves

    assert waves([3, 3, 3, 5, 1], 6) == [[0, 1], [2], [3, 4]]
    assert waves([9, 1], 6) == [[0], [1]]  # one work per wave at least, even over the budget
    assert waves([3, 3, 3], None) == [[0, 1, 2]]


def test_search_says_in_one_line_that_it_needs_the_model_in_memory(tmp_path, monkeypatch):
    from abliterate.errors import UserError
    from abliterate.model import streaming, study

    model = tiny.make_model("llama", tmp_path / "model", layers=1)
    study._check_fits(model, "float32", "cpu")  # fits: nothing to say
    monkeypatch.setattr(streaming, "free_bytes", lambda device: [1024])
    with pytest.raises(UserError, match=r"^search needs the model in memory \(0\.0 GB in float32, 0\.0 GB free on cpu\); "
                                        r"set search.trials: 0"):
        study._check_fits(model, "float32", "cpu")


def test_a_memory_budget_caps_what_auto_counts_on(tmp_path, monkeypatch):
    from abliterate.errors import UserError
    from abliterate.model.streaming import free_bytes, parse_size, place

    assert [parse_size(t) for t in ("64kB", "1.5GB", "2048", "3 MB")] == [65536, 3 << 29, 2048, 3 << 20]
    model = tiny.make_model("llama", tmp_path / "model", layers=1)
    assert place("auto", model, "float32", "cpu") == "one"
    monkeypatch.setenv("ABLITERATE_MEMORY_BUDGET", "64kB")
    assert free_bytes("cpu") == [65536] and place("auto", model, "float32", "cpu") == "stream"
    monkeypatch.setenv("ABLITERATE_MEMORY_BUDGET", "lots")
    with pytest.raises(UserError, match="ABLITERATE_MEMORY_BUDGET='lots' is not a size"):
        free_bytes("cpu")


def test_a_spread_model_computes_what_a_loaded_one_does(tmp_path):
    import torch

    from abliterate.model.modelio import load_model
    from abliterate.model.streaming import load_spread

    model_dir = tiny.make_model("qwen2", tmp_path / "model", layers=2)
    ids = torch.tensor([[256, 40, 41, 42, 43]])
    with torch.no_grad():
        expected = load_model(model_dir, device="cpu")(ids).logits
        spread = load_spread(model_dir, "float32")  # on a machine without GPUs, accelerate places it on the CPU
        assert not spread.training and torch.equal(spread(ids).logits, expected)


def test_auto_dtype_is_float32_on_cpu_and_the_checkpoints_own_on_a_gpu(tmp_path):
    from abliterate.errors import UserError
    from abliterate.model.streaming import resolve_dtype

    bf16 = tiny.make_model("llama", tmp_path / "bf16", layers=1, dtype="bfloat16")
    fp32 = tiny.make_model("llama", tmp_path / "fp32", layers=1)
    assert resolve_dtype("auto", "cpu", bf16) == "float32"
    assert resolve_dtype("auto", "mps", bf16) == "float32"
    assert resolve_dtype("auto", "cuda", bf16) == "bfloat16" and resolve_dtype("auto", "cuda:1", fp32) == "float32"
    assert resolve_dtype("checkpoint", "cpu", bf16) == "bfloat16"
    assert resolve_dtype("float16", "cpu", bf16) == "float16"
    with pytest.raises(UserError, match="^dtype must be one of auto, checkpoint, float32, bfloat16, float16, got 'fp8'$"):
        resolve_dtype("fp8", "cpu", bf16)


def test_the_streamed_capture_batches_keep_a_layers_work_within_half_its_bytes():
    from abliterate.model.streaming import MIN_LAYER_WORK, layer_batch

    config = {"hidden_size": 2048, "intermediate_size": 5504, "num_attention_heads": 16}
    per_prompt = 185 * 4 * (3 * 5504 + 6 * 2048 + 16 * 185)  # bytes inside a layer for one 185-token prompt
    layer = 202 * 2**20
    size = layer_batch(config, 185, 4, layer, 32)
    assert size * per_prompt <= layer // 2 < (size + 1) * per_prompt
    assert layer_batch(config, 185, 4, layer, 2) == 2  # never above the configured batch size
    assert layer_batch(config, 20000, 4, layer, 32) == 1  # at least one prompt
    assert layer_batch({"hidden_size": 64, "intermediate_size": 128}, 50, 4, 10_000, 32) == 32  # tiny: no cap
    assert MIN_LAYER_WORK // (50 * 4 * (3 * 128 + 6 * 64 + 50)) > 32
