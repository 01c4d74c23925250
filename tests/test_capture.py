"""capture: hook-based activations, index convention, batching, parquet layout, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests import tiny
from tests.measure_helpers import HARMFUL, HARMLESS, error_line, invoke, run_module, tree, write_lines

FAMILIES = ("llama", "qwen2", "gemma3")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    import torch

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("models")
    return {family: tiny.make_model(family, root / family, layers=3) for family in FAMILIES}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    # varied lengths, so that batches need padding
    lines = HARMFUL + HARMLESS[:3] + ["Hi", "A much longer prompt that goes on and on about nothing in particular at all."]
    return write_lines(tmp_path_factory.mktemp("prompts") / "mixed.txt", lines)


def run_capture(model: Path, prompts: Path, out: Path, **options) -> Path:
    from abliterate.model.capture import capture

    capture(model, str(prompts), out, **options)
    return out


def read(out: Path):
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    hidden = table.schema.field("activation").type.list_size
    acts = table.column("activation").combine_chunks().flatten().to_numpy().reshape(-1, hidden)
    return table, acts


def reference_states(model_dir: Path, ids: list[int], offsets: list[int]):
    """What hooks on each decoder layer's input (and the last layer's output) see, prompt alone."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    layers = model.model.layers
    seen: dict[int, torch.Tensor] = {}
    cols = [len(ids) + o for o in offsets]

    def pre(index):
        def hook(_module, args, kwargs):
            seen[index] = (args[0] if args else kwargs["hidden_states"])[0, cols].clone()
        return hook

    def post(_module, _args, output):
        seen[len(layers)] = (output[0] if isinstance(output, tuple) else output)[0, cols].clone()

    handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(post))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    for handle in handles:
        handle.remove()
    states = torch.stack([seen[i] for i in range(len(layers) + 1)]).numpy()  # [L+1, P, H]
    final_norm = out.hidden_states[-1][0, cols].numpy()  # after the final norm
    return states, final_norm, model


@pytest.mark.parametrize("family", FAMILIES)
def test_bit_exact_against_layer_input_hooks(models, prompt_file, tmp_path, family):
    from abliterate.model.modelio import load_tokenizer
    from abliterate.model.prompts import load_prompts, render

    # the plain forward (no shared prefix) is bit-exact; the shared prefix is checked below
    out = run_capture(models[family], prompt_file, tmp_path / "a.parquet", batch_size=1, shared_prefix=False)
    table, acts = read(out)
    tokenizer = load_tokenizer(models[family])
    texts = load_prompts(prompt_file)
    sequences = render(tokenizer, texts)
    layers = table.column("layer").to_numpy()
    prompts = table.column("prompt").to_numpy()
    for p in (0, 7, len(texts) - 1):
        states, final_norm, model = reference_states(models[family], sequences[p], [-1])
        for index in range(states.shape[0]):
            stored = acts[(layers == index) & (prompts == p)]
            assert stored.shape == (1, tiny.HIDDEN)
            assert np.array_equal(stored[0], states[index, 0]), (family, p, index)
        last = acts[(layers == 3) & (prompts == p)][0]
        # index L is the last layer's output *before* the final norm
        assert not np.allclose(last, final_norm[0], rtol=1e-3)
        import torch

        with torch.no_grad():
            renormed = model.model.norm(torch.from_numpy(last)[None]).numpy()[0]
        np.testing.assert_allclose(renormed, final_norm[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_batching_and_padding_do_not_change_vectors(models, prompt_file, tmp_path, family):
    _, alone = read(run_capture(models[family], prompt_file, tmp_path / "one.parquet", batch_size=1))
    _, batched = read(run_capture(models[family], prompt_file, tmp_path / "many.parquet", batch_size=4))
    relative = np.linalg.norm(alone - batched, axis=1) / np.linalg.norm(alone, axis=1)
    assert relative.max() < 1e-5


def test_parquet_layout_and_metadata(models, prompt_file, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from abliterate.hashing import sha256_file as file_hash

    out = run_capture(models["llama"], prompt_file, tmp_path / "a.parquet", batch_size=3, positions="-1,-3")
    handle = pq.ParquetFile(out)
    schema = handle.schema_arrow
    assert schema.field("prompt").type == pa.int32()
    assert schema.field("position").type == pa.int16()
    assert schema.field("layer").type == pa.int16()
    assert schema.field("activation").type == pa.list_(pa.float32(), tiny.HIDDEN)
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert meta["num_layers"] == "3" and meta["num_indices"] == "4" and meta["hidden_size"] == str(tiny.HIDDEN)
    assert meta["model"] == "LlamaForCausalLM" and meta["dtype"] == "float32" and meta["positions"] == "-3,-1"
    assert meta["prompt_file_sha256"] == file_hash(prompt_file)
    assert len(meta["template_sha256"]) == 64 and "entering decoder layer i" in meta["index_convention"]
    # every row group holds one residual index; the file is sorted by index, prompt, position
    for group in range(handle.num_row_groups):
        assert len(set(handle.read_row_group(group, columns=["layer"]).column("layer").to_pylist())) == 1
    table = handle.read()
    keys = list(zip(table.column("layer").to_pylist(), table.column("prompt").to_pylist(),
                    table.column("position").to_pylist()))
    n = len(HARMFUL) + 5
    assert keys == sorted(keys) and len(keys) == 4 * n * 2
    assert set(table.column("position").to_pylist()) == {-3, -1}


def test_several_positions_match_hooks(models, prompt_file, tmp_path):
    from abliterate.model.modelio import load_tokenizer
    from abliterate.model.prompts import load_prompts, render

    out = run_capture(models["qwen2"], prompt_file, tmp_path / "a.parquet", batch_size=1, positions="-2,-1,-4")
    table, acts = read(out)
    sequences = render(load_tokenizer(models["qwen2"]), load_prompts(prompt_file))
    states, _, _ = reference_states(models["qwen2"], sequences[2], [-4, -2, -1])
    rows = (table.column("prompt").to_numpy() == 2)
    got = acts[rows].reshape(4, 3, tiny.HIDDEN)  # [index, position (-4, -2, -1), H]
    # positions after the shared prefix (on by default): equal up to the rounding of other matmul shapes
    assert (np.linalg.norm(got - states, axis=-1) / np.linalg.norm(states, axis=-1)).max() <= 1e-5


def test_rerun_is_byte_identical(models, prompt_file, tmp_path):
    first = run_capture(models["gemma3"], prompt_file, tmp_path / "a.parquet", batch_size=4)
    import torch

    # same thread count as this process (float sums may be split differently across threads)
    second = run_module("capture", "--model", models["gemma3"], "--prompts", prompt_file,
                        "--out", tmp_path / "b.parquet", "--batch-size", "4",
                        env={"OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert second.returncode == 0, second.stderr
    assert first.read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert tree(tmp_path) == ["a.parquet", "b.parquet"]  # no scratch files left


def test_chat_template_rendered_without_double_bos(models, prompt_file):
    from abliterate.model.modelio import load_tokenizer
    from abliterate.model.prompts import render

    tokenizer = load_tokenizer(models["llama"])
    ids = render(tokenizer, ["hello"], system_prompt="be brief")[0]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_template_file_for_model_without_template(tmp_path, prompt_file):
    model = tiny.make_model("llama", tmp_path / "plain", layers=2, chat_template=False)
    template = tmp_path / "t.jinja"
    template.write_text(tiny.CHAT_TEMPLATE)
    out = run_capture(model, prompt_file, tmp_path / "a.parquet", chat_template=str(template))
    assert out.is_file()


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written


def _bad(capsys, tmp_path, argv, expect: str):
    from stages.capture import app

    before = tree(tmp_path)
    code, err = invoke(app, argv, capsys)
    assert code == 2
    assert expect in error_line(err)
    assert tree(tmp_path) == before


def test_missing_and_empty_prompt_files(models, tmp_path, capsys):
    out = tmp_path / "out" / "a.parquet"
    _bad(capsys, tmp_path, ["--model", models["llama"], "--prompts", tmp_path / "nope.txt", "--out", out], "does not exist")
    empty = write_lines(tmp_path / "empty.txt", ["", "   "])
    _bad(capsys, tmp_path, ["--model", models["llama"], "--prompts", empty, "--out", out], "is empty")


def test_model_without_chat_template(tmp_path, prompt_file, capsys):
    model = tiny.make_model("llama", tmp_path / "plain", layers=2, chat_template=False)
    _bad(capsys, tmp_path, ["--model", model, "--prompts", prompt_file, "--out", tmp_path / "a.parquet"],
         "no chat template")


def test_bad_model_folders(tmp_path, prompt_file, capsys):
    out = tmp_path / "a.parquet"
    _bad(capsys, tmp_path, ["--model", tmp_path / "missing", "--prompts", prompt_file, "--out", out], "does not exist")
    (tmp_path / "noconfig").mkdir()
    _bad(capsys, tmp_path, ["--model", tmp_path / "noconfig", "--prompts", prompt_file, "--out", out], "no config.json")
    binonly = tmp_path / "binonly"
    binonly.mkdir()
    (binonly / "config.json").write_text("{}")
    (binonly / "pytorch_model.bin").write_bytes(b"\0")
    _bad(capsys, tmp_path, ["--model", binonly, "--prompts", prompt_file, "--out", out], ".bin")


def test_bad_options(models, prompt_file, tmp_path, capsys):
    base = ["--model", models["llama"], "--prompts", prompt_file, "--out", tmp_path / "a.parquet"]
    _bad(capsys, tmp_path, [*base, "--batch-size", "many"], "batch-size")  # a param of the wrong type
    _bad(capsys, tmp_path, [*base, "--batch-size", "0"], "at least 1")
    _bad(capsys, tmp_path, [*base, "--positions", "last"], "negative integers")
    _bad(capsys, tmp_path, [*base, "--positions", "0"], "offset from the end")
    _bad(capsys, tmp_path, [*base, "--positions", "-500"], "before the start")
    _bad(capsys, tmp_path, [*base, "--dtype", "float8"], "dtype")


def test_cli_error_is_one_line_exit_2(tmp_path, prompt_file):
    result = run_module("capture", "--model", tmp_path / "missing", "--prompts", prompt_file, "--out", tmp_path / "a.parquet")
    assert result.returncode == 2
    assert error_line(result.stderr) and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "a.parquet").exists()


@pytest.mark.parametrize("family", [f for f in tiny.FAMILIES if f not in FAMILIES])
def test_every_family_captures_all_indices(family, tmp_path, prompt_file):
    """MoE, fused-expert, MLA and linear-attention models: L + 1 indices, batching-independent."""
    model = tiny.make_model(family, tmp_path / family, layers=2)
    table, alone = read(run_capture(model, prompt_file, tmp_path / "one.parquet", batch_size=1))
    _, batched = read(run_capture(model, prompt_file, tmp_path / "many.parquet", batch_size=5))
    assert sorted(set(table.column("layer").to_pylist())) == [0, 1, 2]
    relative = np.linalg.norm(alone - batched, axis=1) / np.linalg.norm(alone, axis=1)
    assert relative.max() < 1e-5


class _Messages:
    """A reporter that keeps its messages (the progress tasks do nothing)."""

    def __init__(self):
        from abliterate.progress import Silent

        self.lines: list[str] = []
        self._silent = Silent()

    def message(self, text: str) -> None:
        self.lines.append(text)

    def task(self, *args, **kwargs):
        return self._silent.task(*args, **kwargs)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_shared_prefix_equals_the_plain_forward(family, tmp_path, prompt_file):
    model = tiny.make_model(family, tmp_path / "model", layers=3)
    options = dict(batch_size=4, positions="-1,-3", system_prompt="You are a careful assistant.")
    plain_table, plain = read(run_capture(model, prompt_file, tmp_path / "plain.parquet", shared_prefix=False, **options))
    heard = _Messages()
    shared_table, shared = read(run_capture(model, prompt_file, tmp_path / "shared.parquet", report=heard, **options))
    for column in ("prompt", "position", "layer"):
        assert plain_table.column(column).equals(shared_table.column(column))
    relative = np.linalg.norm(plain - shared, axis=1) / np.linalg.norm(plain, axis=1)
    used = [line for line in heard.lines if line.startswith("shared prefix:")]
    if family == "qwen3_next":  # linear-attention state cannot be repeated over a batch: every token computed
        assert any("not used" in line for line in heard.lines) and np.array_equal(plain, shared)
    else:
        # the system block and role header (>= 20 byte-level tokens here) ran once
        assert used and int(used[0].split()[2]) >= 20, heard.lines
        assert relative.max() <= 1e-4


def test_shared_prefix_falls_back_when_the_first_batch_disagrees(models, prompt_file, tmp_path, monkeypatch):
    from abliterate.model import prefix

    system = "You are a careful assistant."  # a prefix worth sharing (>= 25% of the tokens)
    _, plain = read(run_capture(models["llama"], prompt_file, tmp_path / "plain.parquet", batch_size=4,
                                shared_prefix=False, system_prompt=system))
    monkeypatch.setattr(prefix, "TOLERANCE", -1.0)  # no agreement is good enough
    heard = _Messages()
    _, shared = read(run_capture(models["llama"], prompt_file, tmp_path / "shared.parquet", batch_size=4,
                                 report=heard, system_prompt=system))
    assert np.array_equal(plain, shared)
    assert any(line.startswith("shared prefix not used: the first batch differs") for line in heard.lines)


def test_shared_length_leaves_the_captured_positions_after_the_prefix():
    from abliterate.model.prefix import MIN_PREFIX, shared_length

    assert shared_length([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 9, 9]], keep=1) == 5
    assert shared_length([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]], keep=2) == 4  # 6 - 2 left for positions
    assert shared_length([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]], keep=1) == 5  # one token always after it
    assert shared_length([[1, 2, 9, 4, 5, 6], [1, 2, 3, 4, 5, 6]], keep=1) == 0 < MIN_PREFIX


def test_a_prefix_too_small_to_pay_is_not_used(models, prompt_file, tmp_path):
    heard = _Messages()
    _, shared = read(run_capture(models["llama"], prompt_file, tmp_path / "shared.parquet", batch_size=4, report=heard))
    _, plain = read(run_capture(models["llama"], prompt_file, tmp_path / "plain.parquet", batch_size=4,
                                shared_prefix=False))
    assert np.array_equal(plain, shared)  # no system prompt: the role header alone is under 25% of the tokens
    assert any(line.startswith("shared prefix not used: its") for line in heard.lines), heard.lines
