"""plan: settings parsing, per-shard documents, determinism, and every bad input it must refuse."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import tiny
from ablation_util import run_plan, write_directions, write_model_yaml, write_scores
from abliterate.errors import UserError
from abliterate.layers import auto_layers, load_overrides, parse_layers, resolve_layer_edits
from abliterate.targets import parse_targets
from stages.cliutil import run_app
from stages.plan import app


def test_layer_specs():
    assert parse_layers("auto", 30) is None
    assert parse_layers("8-12", 30) == [8, 9, 10, 11, 12]
    assert parse_layers("3,5,8-10", 30) == [3, 5, 8, 9, 10]
    assert parse_layers("12", 30) == [12]
    assert parse_layers("[3, 5]", 30) == [3, 5]
    for bad, why in (("abc", "cannot read"), ("5-3", "empty"), ("28-30", "layer 30"), ("", "empty")):
        with pytest.raises(UserError, match=why):
            parse_layers(bad, 30)


def test_target_specs():
    assert parse_targets("mlp, attention") == ("attention", "mlp")
    with pytest.raises(UserError, match="unknown target 'mlps'"):
        parse_targets("attention,mlps")


def test_overrides_come_from_a_yaml_key(tmp_path):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({"ablate": {"overrides": [{"layer": 3, "scale": 0.5}], "none": None}}))
    assert load_overrides(f"{cfg}:ablate.overrides") == [{"layer": 3, "scale": 0.5}]
    assert load_overrides(f"{cfg}:ablate.none") == []
    assert load_overrides("") == []
    plain = tmp_path / "list.yml"
    plain.write_text("- {layer: 1}\n")
    assert load_overrides(str(plain)) == [{"layer": 1}]
    with pytest.raises(UserError, match="no key 'ablate.missing'"):
        load_overrides(f"{cfg}:ablate.missing")
    with pytest.raises(UserError, match="must be a list"):
        load_overrides(f"{cfg}:ablate")
    with pytest.raises(UserError, match="does not exist"):
        load_overrides(f"{tmp_path}/nope.yml:ablate")


def test_overrides_replace_and_extend_the_default_layers():
    edits = resolve_layer_edits([1, 2, 3], 5, 0.8, 0.0, [
        {"layer": 2, "measurement": 4, "scale": 1.2},
        {"layer": 2, "measurement": 6},  # a second direction for the same layer, applied after
        {"layer": 7, "sparsity": 0.1},
    ], num_layers=10)
    assert [(e.layer, e.measurement, e.scale, e.sparsity) for e in edits] == [
        (1, 5, 0.8, 0.0), (2, 4, 1.2, 0.0), (2, 6, 1.0, 0.0), (3, 5, 0.8, 0.0), (7, 5, 1.0, 0.1)]
    for bad, why in (({"layer": 10}, "layer must be"), ({"layer": 1, "measurement": 11}, "out of range"),
                     ({"layer": 1, "scael": 1}, "unknown key 'scael'"), ({"scale": 1}, "missing layer"),
                     ({"layer": 1, "sparsity": 1.0}, "sparsity")):
        with pytest.raises(UserError, match=why):
            resolve_layer_edits([1], 5, 1.0, 0.0, [bad], num_layers=10)


def test_auto_layers_cover_the_run_of_good_indices_around_the_best():
    quality = [0.0, 0.1, 0.3, 0.6, 1.0, 0.7, 0.55, 0.2, 0.6, 0.1]  # indices 0..9, L = 9
    scores = [{"index": i, "quality": q} for i, q in enumerate(quality)]
    # indices 3..6 reach half of the best: layers writing into them (2..5) and reading them (3..6)
    assert auto_layers(scores, 4, 0.5, num_layers=9) == [2, 3, 4, 5, 6]
    assert auto_layers(scores, 4, 1.0, num_layers=9) == [3, 4]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    model = tiny.make_model("llama", root / "base", layers=4, max_shard_size="150KB")
    write_directions(root / "directions.safetensors", 4)
    write_scores(root / "layers.json", 4, best=2)
    write_model_yaml(model, root / "model.yaml")
    return root


def _plan(root, out, model=None, **settings):
    """The plan's settings (what _settings.json holds)."""
    return run_plan(model or root / "base", root / "model.yaml",
                    settings.pop("directions", root / "directions.safetensors"), root / "layers.json", out,
                    **settings).settings


def test_every_shard_gets_a_deterministic_plan(llama, tmp_path):
    _plan(llama, tmp_path / "a", layers="1", targets="attention")
    _plan(llama, tmp_path / "b", layers="1", targets="attention")
    keys = yaml.safe_load((llama / "model.yaml").read_text())["shards"]
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted([f"{k}.json" for k in keys] + ["_settings.json", "_output.json"])
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    docs = [json.loads((tmp_path / "a" / f"{k}.json").read_text()) for k in keys]
    edited = [e["tensor"] for d in docs for e in d["edits"]]
    assert edited == ["model.layers.1.self_attn.o_proj.weight"]
    assert sum(1 for d in docs if not d["edits"] and not d["vectors"]) == len(docs) - 1
    edit = next(e for d in docs for e in d["edits"])
    vectors = next(d["vectors"] for d in docs if d["edits"])
    assert len(vectors[edit["vector"]]) == 64 and edit["scale"] == 1.0 and edit["norm_preserve"] is True


def test_scale_changes_only_the_plans_of_edited_shards_and_zero_drops_edits(llama, tmp_path):
    _plan(llama, tmp_path / "a", layers="1-2")
    _plan(llama, tmp_path / "b", layers="1-2", scale=0.5)
    _plan(llama, tmp_path / "z", layers="1-2", scale=0.0)
    for path in sorted((tmp_path / "a").glob("0*.json")):
        edits = json.loads(path.read_text())["edits"]
        assert (path.read_bytes() == (tmp_path / "b" / path.name).read_bytes()) == (not edits)
        assert json.loads((tmp_path / "z" / path.name).read_text())["edits"] == []


def test_auto_uses_the_scores(llama, tmp_path):
    settings = _plan(llama, tmp_path / "p")
    assert settings["defaults"]["measurement"] == 2
    assert {e["layer"] for e in settings["layers"]} and all(0 <= e["layer"] < 4 for e in settings["layers"])


def test_layer_two_never_edits_layers_twenty_to_twenty_nine(tmp_path):
    model = tiny.make_model("llama", tmp_path / "base", layers=30, max_shard_size="2MB")
    write_directions(tmp_path / "directions.safetensors", 30)
    write_scores(tmp_path / "layers.json", 30, best=10)
    write_model_yaml(model, tmp_path / "model.yaml")
    _plan(tmp_path, tmp_path / "plan", layers="2", measurement="10")
    tensors = [e["tensor"] for p in (tmp_path / "plan").glob("0*.json") for e in json.loads(p.read_text())["edits"]]
    assert sorted(tensors) == ["model.layers.2.mlp.down_proj.weight", "model.layers.2.self_attn.o_proj.weight"]
    with pytest.raises(UserError, match="layer 30"):
        _plan(tmp_path, tmp_path / "plan2", layers="2,30")


def _copy_model(src, dst, edit=None, config=None):
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit:
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        for shard in sorted(set(index["weight_map"].values())):
            tensors = load_file(str(dst / shard))
            if edit(tensors):
                save_file(tensors, str(dst / shard), metadata={"format": "pt"})
                index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != shard}
                index["weight_map"].update({n: shard for n in tensors})
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def _fp8(tensors):
    name = "model.layers.1.self_attn.o_proj.weight"
    if name in tensors:
        tensors[name] = tensors[name].to(torch.float8_e4m3fn)
        tensors[name + "_scale_inv"] = torch.ones(1)
        return True
    return False


def test_bad_inputs_are_refused_with_one_line(llama, tmp_path):
    d = tmp_path / "d.safetensors"
    cases = []
    write_directions(d, 4, hidden=32)
    cases.append(({"directions": d}, "hidden size 32 but the model has 64"))
    cases.append(({"layers": "1", "measurement": "5"}, "measurement 5 is out of range"))
    cases.append(({"layers": "4"}, "layer 4, but the model has layers 0..3"))
    zero = tmp_path / "zero.safetensors"
    tensors = load_file(str(write_directions(zero, 4)))
    tensors["unit.2"] = torch.zeros(64)
    save_file(tensors, str(zero), metadata={"num_layers": "4", "hidden_size": "64", "num_indices": "5", "format": "1"})
    cases.append(({"directions": zero, "layers": "1", "measurement": "2"}, "index 2 is zero"))
    nan = tmp_path / "nan.safetensors"
    tensors["unit.2"] = torch.full((64,), float("nan"))
    save_file(tensors, str(nan), metadata={"num_layers": "4", "hidden_size": "64", "num_indices": "5", "format": "1"})
    cases.append(({"directions": nan, "layers": "1", "measurement": "2"}, "NaN"))
    cases.append(({"layers": "1", "targets": "experts"}, "layer 1 has no tensor for targets experts"))
    cases.append(({"layers": "1", "targets": "embeddings,attention",
                   "model": _copy_model(llama / "base", tmp_path / "tied", config={"tie_word_embeddings": True})},
                  "tied to the output head"))
    cases.append(({"layers": "1", "model": _copy_model(llama / "base", tmp_path / "fp8", edit=_fp8)},
                  "o_proj.weight .*quantized.*not supported yet"))
    cases.append(({"layers": "1", "model": _copy_model(llama / "base", tmp_path / "odd", config={"model_type": "odd"})},
                  "architecture 'odd' .* writer-like tensors found: .*o_proj"))
    for i, (settings, why) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(UserError, match=why):
            _plan(llama, out, **settings)
        assert not out.exists()


def test_mxfp4_experts_are_refused(tmp_path):
    model = tiny.make_model("gpt_oss", tmp_path / "base", layers=2)

    def mxfp4(tensors):
        name = "model.layers.1.mlp.experts.down_proj"
        if name not in tensors:
            return False
        tensors[name + "_blocks"] = torch.zeros(4, 64, 2, 16, dtype=torch.uint8)
        tensors[name + "_scales"] = torch.zeros(4, 64, 2, dtype=torch.uint8)
        del tensors[name]
        return True

    quant = _copy_model(model, tmp_path / "mxfp4", edit=mxfp4)
    write_directions(tmp_path / "directions.safetensors", 2)
    write_scores(tmp_path / "layers.json", 2, best=1)
    write_model_yaml(quant, tmp_path / "model.yaml")
    with pytest.raises(UserError, match="experts.down_proj of layer 1 is stored quantized.*down_proj_blocks"):
        _plan(tmp_path, tmp_path / "plan", model=quant, layers="1")
    _plan(tmp_path, tmp_path / "plan", model=quant, layers="0", targets="attention")  # other layers are fine


def test_out_of_date_shard_list_and_the_cli_error_line(llama, tmp_path, capsys):
    stale = tmp_path / "model.yaml"
    stale.write_text(yaml.safe_dump({"shards": {"00001": "model-00001-of-00009.safetensors"}}))
    argv = ["--model", str(llama / "base"), "--shards", str(stale), "--directions", str(llama / "directions.safetensors"),
            "--scores", str(llama / "layers.json"), "--out", str(tmp_path / "plan"), "--layers", "1"]
    with pytest.raises(SystemExit) as exit_:
        run_app(app, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "run `abliterate use SOURCE` again" in err[0]
    assert not (tmp_path / "plan").exists()


def test_per_layer_measurement_removes_each_layers_own_direction(llama, tmp_path):
    """measurement per-layer: layer k's edits remove unit.(k+1), the direction of the residual it writes."""
    import numpy as np
    from safetensors.numpy import load_file as load_numpy

    settings = _plan(llama, tmp_path / "p", layers="1-2", measurement="per-layer", targets="attention", projected=False)
    assert settings["defaults"]["measurement"] == "per-layer"
    assert [(e["layer"], e["measurement"]) for e in settings["layers"]] == [(1, 2), (2, 3)]
    units = load_numpy(str(llama / "directions.safetensors"))
    for path in (tmp_path / "p").glob("0*.json"):
        doc = json.loads(path.read_text())
        for edit in doc["edits"]:
            r = np.asarray(doc["vectors"][edit["direction"]])
            expected = units[f"unit.{edit['layer'] + 1}"].astype(np.float64)
            assert np.allclose(r, expected / np.linalg.norm(expected), atol=1e-7)
    with pytest.raises(UserError, match="must be auto, per-layer or a residual index"):
        _plan(llama, tmp_path / "q", layers="1", measurement="every")


def test_the_defaults_push_each_attention_writer_against_its_own_direction(llama, tmp_path):
    """plan's defaults, params.yaml's: layers auto, attention writers only, per-layer directions, scale 2.5,
    biprojection."""
    from abliterate.planning import plan

    result = plan(llama / "base", llama / "model.yaml", llama / "directions.safetensors", llama / "layers.json",
                  tmp_path / "p")
    assert result.edits and {e.role for e in result.edits} == {"attention"}
    assert all(e.measurement == e.layer + 1 and e.scale == 2.5 and e.projected for e in result.edits)
    assert result.settings["defaults"]["measurement"] == "per-layer"
