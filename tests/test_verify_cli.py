"""`intertwiners verify` on third-party model specs, its argument checks and its NaN-safe verdict."""

import json
import math
import sys
import textwrap

import pytest

from intertwiners import cli
from intertwiners import symmetries as symmetries_pkg


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """An importable module of model factories; CALLS counts how often a model was built."""
    (tmp_path / "user_models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        CALLS = []

        def mlp():
            CALLS.append("mlp")
            return nn.Sequential(nn.Linear(6, 8), nn.ReLU6(inplace=True), nn.Linear(8, 3))

        def mlp_with_input():
            CALLS.append("mlp_with_input")
            return mlp(), torch.randn(4, 6)

        def nan_mlp():
            m = mlp()
            with torch.no_grad():
                m[0].weight[0, 0] = float("nan")
            return m, torch.randn(4, 6)

        def broken():
            raise RuntimeError("no such weights")

        def not_a_model():
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_models", None)
    import user_models

    yield user_models
    sys.modules.pop("user_models", None)


def run(capsys, *argv):
    rc = cli.main(["verify", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_factory_with_and_without_input(factories, capsys):
    rc, out, _ = run(capsys, "user_models:mlp_with_input", "--json", "--trials", "1")
    res = json.loads(out)
    assert rc == 0 and res["ok"] and res["checked"] and res["max_rel"] <= 1e-9
    assert [s["kind"] for s in res["spaces"].values()] == ["permutation"]  # ReLU6: permutations only
    rc, out, _ = run(capsys, "user_models:mlp", "--input-shape", "6", "--trials", "1")
    assert rc == 0 and "OK: every space within rtol" in out


@pytest.mark.parametrize("argv,message", [
    (["--rtol", "nan"], "--rtol must be a finite number"),
    (["--rtol", "inf"], "--rtol must be a finite number"),
    (["--rtol=-1e-9"], "--rtol must be a finite number"),
    (["--width", "0"], "--width must be a positive integer"),
    (["--trials", "0"], "--trials must be a positive integer"),
    (["--batch", "1"], "--batch must be at least 2"),
    (["--tokens", "0"], "--tokens must be a positive integer"),
    (["--input-size=-3"], "--input-size must be a positive integer"),
    (["--input-shape", "3,x"], "--input-shape must be positive integers"),
    (["--warmup=-1"], "--warmup must be 0 or more"),
])
def test_bad_arguments_rejected_before_any_work(factories, capsys, argv, message):
    rc, out, err = run(capsys, "user_models:mlp", *argv)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1 and out == ""
    assert factories.CALLS == []  # checked before the model was built


@pytest.mark.parametrize("spec,message", [
    ("user_models:broken", "the factory raised RuntimeError: no such weights"),
    ("user_models:not_a_model", "must return an nn.Module"),
    ("user_models:missing", "has no callable 'missing'"),
    ("no_such_package.models:build", "could not import 'no_such_package.models'"),
    ("timm:resnet18", "timm"),
    ("hf:gpt5", "unknown Hugging Face family"),
    ("not a spec", "neither a saved model folder"),
])
def test_bad_model_specs_are_one_line(factories, capsys, spec, message):
    if spec.startswith("timm:"):
        try:
            import timm  # noqa: F401
            pytest.skip("timm is importable here: the error path is not reachable")
        except Exception:
            pass
    if spec.startswith("hf:"):
        pytest.importorskip("transformers")
    rc, _, err = run(capsys, spec, "--trials", "1")
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_wrong_input_shape_is_one_line(factories, capsys):
    rc, _, err = run(capsys, "user_models:mlp", "--input-shape", "5", "--trials", "1")
    assert rc == 2 and "does not run on an input of shape (8, 5)" in err and len(err.strip().splitlines()) == 1


def test_nan_weights_never_ok(factories, capsys):
    rc, out, err = run(capsys, "user_models:nan_mlp", "--trials", "1")
    assert rc == 2 and "not finite" in err and "OK" not in out


class _Row:
    def __init__(self, space, max_rel):
        self.space, self.size, self.kind, self.mode, self.max_abs, self.max_rel = space, 8, "permutation", "eval", \
            max_rel, max_rel


class _Report:
    def __init__(self, rows):
        self.rows = rows

    def __str__(self):
        return "\n".join(f"{r.space} {r.max_rel}" for r in self.rows)


@pytest.mark.parametrize("errors", [[0.0, math.nan], [math.nan, 0.0], [1e-3, 0.0], [0.0, math.inf]])
def test_a_nan_or_large_error_fails(factories, capsys, monkeypatch, errors):
    """The verdict takes a NaN-propagating maximum: max(0, nan) must not read as 0."""
    monkeypatch.setattr(symmetries_pkg, "verify_symmetry",
                        lambda *a, **k: _Report([_Row(f"s{i}", e) for i, e in enumerate(errors)]))
    rc, out, _ = run(capsys, "user_models:mlp_with_input", "--trials", "1")
    assert rc == 1 and "FAILED" in out and "OK" not in out
    rc, out, _ = run(capsys, "user_models:mlp_with_input", "--trials", "1", "--json")
    res = json.loads(out)
    assert rc == 1 and res["ok"] is False and not res["max_rel"] == 0.0


def test_nothing_checked_is_said(factories, capsys, monkeypatch):
    monkeypatch.setattr(symmetries_pkg, "verify_symmetry", lambda *a, **k: _Report([]))
    rc, out, _ = run(capsys, "user_models:mlp_with_input", "--trials", "1")
    assert "NOTHING CHECKED" in out and "OK" not in out


def test_hf_tiny_gpt2_token_input(capsys):
    """hf:gpt2 builds a tiny random GPT-2 and feeds it token ids; the verdict is honest either way."""
    pytest.importorskip("transformers")
    from intertwiners.model_specs import hf_tiny

    model = hf_tiny("gpt2")
    assert model.config.n_layer == 2 and model.config.n_embd == 64
    rc, out, err = run(capsys, "hf:gpt2", "--batch", "2", "--tokens", "8", "--trials", "1", "--json")
    if rc == 0:  # an engine that analyses GPT-2
        res = json.loads(out)
        assert res["ok"] and res["checked"] and res["max_rel"] <= 1e-9 and res["spaces"]
    else:  # an engine that cannot: one line, never OK
        assert rc in (1, 2) and "OK" not in out
        if rc == 2:
            assert len(err.strip().splitlines()) == 1


def test_a_local_hugging_face_folder(capsys, tmp_path):
    """A folder written by save_pretrained (safetensors) is verified like align reads it: token ids for a
    language model; its attention heads are spaces and every space is within the float32 tolerance."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=50)).save_pretrained(tmp_path / "llama")
    rc, out, _ = run(capsys, str(tmp_path / "llama"), "--dtype", "float32", "--batch", "2", "--tokens", "6",
                     "--trials", "1", "--json")
    res = json.loads(out)
    assert rc == 0 and res["ok"] and res["checked"]
    assert sum("attention" in name for name in res["spaces"]) == 2, res["spaces"]
