"""`intertwiners align A B` and `intertwiners merge A B C ...`: outputs, the aligned model's function, this
package's folders and Hugging Face folders in and out, bad input (one line, non-zero exit, nothing written)."""

import csv
import json

import pytest
import torch

from intertwiners import data, models
from intertwiners.alignment.comparison import VARIANTS
from intertwiners.cli import main


def nothing_written(tmp_path, out) -> bool:
    return not out.exists() and not any(".partial" in p.name for p in tmp_path.iterdir())


def test_align_cli_writes_model_csv_plot_and_barriers(tmp_path, capsys):
    torch.manual_seed(0)
    for name in ("a", "b"):
        models.save(models.myrtle_cnn(width=2, in_channels=1, input_size=16), tmp_path / name)
    out = tmp_path / "out"
    rc = main(["align", str(tmp_path / "a"), str(tmp_path / "b"), "--dataset", "digits", "--out", str(out),
               "--alphas", "3", "--align-samples", "200"])
    assert rc == 0
    rows = list(csv.DictReader((out / "interpolation.csv").open()))
    variants = {r["variant"] for r in rows}
    assert len(rows) == 3 * len(VARIANTS) and variants == {v[0] for v in VARIANTS}
    assert {"none", "permutation (activations)", "full group (activations)",
            "full group + REPAIR (activations)"} <= variants
    assert all(0 <= float(r["accuracy"]) <= 100 for r in rows)
    assert (out / "interpolation.png").stat().st_size > 0
    barriers = json.loads((out / "barriers.json").read_text())["barriers"]
    assert set(barriers) == variants and all(set(b) == {"loss", "accuracy"} for b in barriers.values())
    aligned, b = models.load(out / "aligned").eval(), models.load(tmp_path / "b").eval()
    _, test = data.load("digits")
    with torch.no_grad():
        assert torch.allclose(aligned(test.x[:32]), b(test.x[:32]), atol=1e-4)
    assert not any(".partial" in p.name for p in list(out.iterdir()) + list(tmp_path.iterdir()))
    assert "full group + REPAIR (activations)" in capsys.readouterr().out


def test_align_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    models.save(models.mlp(256, hidden=(4,)), tmp_path / "a")
    out = tmp_path / "o"
    assert main(["align", str(tmp_path / "a"), str(tmp_path / "missing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("intertwiners align: error:") and "\n" not in err and "does not exist" in err
    models.save(models.mlp(256, hidden=(5,)), tmp_path / "b")
    assert main(["align", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 2
    assert "'fc1.weight'" in capsys.readouterr().err  # the first parameter that differs
    assert main(["align", str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(out), "--alphas", "1"]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["align", str(tmp_path / "a"), str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "holds no model" in capsys.readouterr().err
    models.save(models.mlp(3 * 32 * 32, hidden=(4,)), tmp_path / "c")  # a CIFAR-shaped model, digits data
    assert main(["align", str(tmp_path / "c"), str(tmp_path / "c"), "--out", str(out), "--align-samples", "20"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "\n" not in err.strip()
    assert nothing_written(tmp_path, out)


def test_merge_cli_package_models(tmp_path, capsys):
    torch.manual_seed(1)
    for name in ("a", "b", "c"):
        models.save(models.mlp(256, hidden=(6,)), tmp_path / name)
    out = tmp_path / "m"
    rc = main(["merge", *(str(tmp_path / n) for n in "abc"), "--out", str(out), "--max-rounds", "1",
               "--align-samples", "200"])
    assert rc == 0
    merged = models.load(out / "merged")
    report = json.loads((out / "merge.json").read_text())
    assert report["rounds"] == 1 and len(report["accuracy"]["models"]) == 3
    assert set(report["accuracy"]) == {"merged", "unaligned average", "models"}
    assert merged(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    assert "unaligned average" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "a"), "--out", str(tmp_path / "m2")]) == 2
    assert "at least two" in capsys.readouterr().err
    models.save(models.mlp(256, hidden=(7,)), tmp_path / "d")
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "d"),
                 "--out", str(tmp_path / "m2")]) == 2
    assert "'fc1.weight'" in capsys.readouterr().err
    assert nothing_written(tmp_path, tmp_path / "m2")


# ----------------------------------------------------------------------------------------------------
# Hugging Face folders
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """Three tiny random GPT-2s (tied unembedding) saved with save_pretrained, and a planted one: the first moved
    by a random element of its whole group (same function, other basis)."""
    tf = pytest.importorskip("transformers")
    import intertwiners as it

    root = tmp_path_factory.mktemp("hf")
    config = tf.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16, use_cache=False,
                           bos_token_id=0, eos_token_id=0)
    found = {}
    for seed in range(3):
        torch.manual_seed(seed)
        m = tf.GPT2LMHeadModel(config).eval()
        m.save_pretrained(root / f"gpt{seed}")
        found[seed] = m
    ids = torch.arange(16).reshape(2, 8) % 40
    spec = it.symmetry_spec(found[0], ids)
    planted = it.apply_symmetry(found[0], it.random_symmetry(spec, torch.Generator().manual_seed(5)), spec)
    planted.save_pretrained(root / "planted")
    return root, found, planted, ids


def load_hf(folder):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


def test_align_cli_hugging_face_folders_in_and_out(hf_folders, tmp_path):
    """A planted pair: the aligned folder loads with from_pretrained, holds the same config byte for byte and
    safetensors weights only, computes B's function, and its weights are A's again."""
    root, found, planted, ids = hf_folders
    out = tmp_path / "out"
    assert main(["align", str(root / "gpt0"), str(root / "planted"), "--out", str(out)]) == 0
    got = load_hf(out / "aligned")
    assert (out / "aligned" / "config.json").read_bytes() == (root / "planted" / "config.json").read_bytes()
    assert (out / "aligned" / "model.safetensors").is_file() and not list((out / "aligned").glob("*.bin"))
    with torch.no_grad():
        assert torch.allclose(got(ids).logits, planted(ids).logits, atol=1e-4)
    for (k, p), q in zip(found[0].named_parameters(), got.parameters()):
        assert torch.allclose(p, q, atol=1e-4), k
    report = json.loads((out / "alignment.json").read_text())
    assert report["relative_weight_distance"]["after"] < 1e-4 < report["relative_weight_distance"]["before"]
    assert report["example_input"] == [2, 8]
    attention = [n for n, how in report["found_by"].items() if how.startswith("attention weights")]
    assert attention and all("least squares" in report["found_by"][n] for n in attention)  # planted: exact maps
    assert report["found_by"].keys() == report["residual"].keys() and max(report["residual"].values()) < 1e-4


def test_merge_cli_hugging_face_folders(hf_folders, tmp_path):
    root, found, _, ids = hf_folders
    out = tmp_path / "out"
    assert main(["merge", *(str(root / f"gpt{s}") for s in range(3)), "--out", str(out), "--max-rounds", "1"]) == 0
    merged = load_hf(out / "merged")
    assert (out / "merged" / "config.json").read_bytes() == (root / "gpt0" / "config.json").read_bytes()
    report = json.loads((out / "merge.json").read_text())
    assert report["rounds"] == 1 and report["method"] == "weights" and report["accuracy"] is None
    assert merged(ids).logits.shape == (2, 8, 40)
    assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()  # still tied


def test_hugging_face_bad_input(hf_folders, tmp_path, capsys):
    tf = pytest.importorskip("transformers")
    root, _, _, _ = hf_folders
    out = tmp_path / "out"
    pickled = tmp_path / "pickled"  # config + pytorch_model.bin only: refused, never unpickled
    pickled.mkdir()
    (pickled / "config.json").write_bytes((root / "gpt0" / "config.json").read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    assert main(["align", str(root / "gpt0"), str(pickled), "--out", str(out)]) == 2
    assert "holds no safetensors weights" in capsys.readouterr().err
    wide = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=24, n_head=2, vocab_size=40, n_positions=16))
    wide.save_pretrained(tmp_path / "wide")
    assert main(["align", str(root / "gpt0"), str(tmp_path / "wide"), "--out", str(out)]) == 2
    assert "'transformer.wte.weight': shape (40, 16) vs (40, 24)" in capsys.readouterr().err
    models.save(models.mlp(256, hidden=(4,)), tmp_path / "ours")
    assert main(["merge", str(root / "gpt0"), str(tmp_path / "ours"), "--out", str(out)]) == 2
    assert "huggingface model folder but" in capsys.readouterr().err
    assert main(["align", str(root / "gpt0"), str(root / "gpt1"), "--out", str(out), "--method", "activations"]) == 2
    assert "by their weights" in capsys.readouterr().err
    assert main(["align", str(root / "gpt0"), str(root / "gpt1"), "--out", str(out), "--tokens", "99"]) == 2
    assert "positions" in capsys.readouterr().err
    assert not out.exists() and not any(".partial" in p.name for p in tmp_path.iterdir())


def _folder(path):
    from intertwiners.alignment.checkpoints import load_folder

    return load_folder(path)


@pytest.mark.parametrize("b", ["planted", "gpt1"])
def test_streamed_folder_alignment_is_bit_identical_to_align(hf_folders, tmp_path, b):
    """align_folders (B moved in place, parameters restored from the safetensors files) gives align's elements,
    residuals and moved weights bit for bit; save_streamed writes them as save_like does, A ends as loaded."""
    from safetensors.torch import load_file

    from intertwiners.alignment import align
    from intertwiners.alignment.checkpoints import save_like
    from intertwiners.alignment.streaming import align_folders, can_stream, save_streamed

    root, _, _, ids = hf_folders
    files = [root / name / "model.safetensors" for name in ("gpt0", b)]
    on_disk = [f.read_bytes() for f in files]
    fa, fb = _folder(root / "gpt0"), _folder(root / b)
    assert can_stream(fa, fb)
    a_before = {k: p.clone() for k, p in fa.model.state_dict().items()}
    want = align(fa.model, fb.model, example_input=ids, method="weights")
    got = align_folders(fa, fb, ids)
    assert got.model is fb.model  # moved in place: no copy of B
    assert got.elements.keys() == want.elements.keys() and got.found_by == want.found_by
    for n in want.elements:
        assert torch.equal(got.elements[n], want.elements[n]), n
    assert got.residual == want.residual and got.sweeps == want.sweeps
    for (k, p), q in zip(want.model.state_dict().items(), got.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), k
    for k, p in fa.model.state_dict().items():
        assert torch.equal(p, a_before[k]), k
    save_like(want.model, fb, tmp_path / "in_memory")
    save_streamed(got.model, fb, tmp_path / "streamed")
    x = load_file(tmp_path / "in_memory" / "model.safetensors")
    y = load_file(tmp_path / "streamed" / "model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) and x[k].dtype == y[k].dtype for k in x)
    assert sorted(p.name for p in (tmp_path / "streamed").iterdir()) == sorted(
        p.name for p in (tmp_path / "in_memory").iterdir())
    assert (tmp_path / "streamed" / "config.json").read_bytes() == (root / b / "config.json").read_bytes()
    assert [f.read_bytes() for f in files] == on_disk   # moving the loaded models never writes into their files


def test_streamed_alignment_refuses_folders_it_cannot_restore(hf_folders, tmp_path):
    """A folder whose weights differ from the loaded model's (edited after loading) is not streamed: align
    runs on copies instead and B is left untouched."""
    from intertwiners.alignment.streaming import align_folders, can_stream

    root, _, _, ids = hf_folders
    fa, fb = _folder(root / "gpt0"), _folder(root / "gpt1")
    with torch.no_grad():
        fb.model.transformer.wpe.weight[0, 0] += 1.0
    kept = {k: p.clone() for k, p in fb.model.state_dict().items()}
    assert not can_stream(fa, fb)
    r = align_folders(fa, fb, ids)
    assert r.model is not fb.model
    assert all(torch.equal(p, kept[k]) for k, p in fb.model.state_dict().items())


def test_write_safetensors_round_trips_dtypes(tmp_path):
    from safetensors.torch import load_file

    from intertwiners.alignment.streaming import write_safetensors

    t = {"a": torch.randn(3, 5), "b": torch.arange(4), "c": torch.tensor(2.5), "d": torch.randn(2, 3)}
    write_safetensors(tmp_path / "x.safetensors", list(t), t.__getitem__, torch.bfloat16)
    got = load_file(tmp_path / "x.safetensors")
    assert got["a"].dtype == torch.bfloat16 and torch.equal(got["a"], t["a"].bfloat16())
    assert torch.equal(got["b"], t["b"]) and got["c"].shape == () and torch.equal(got["d"], t["d"].bfloat16())
    t["a"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        write_safetensors(tmp_path / "y.safetensors", list(t), t.__getitem__)


def test_read_slices_reassemble_every_tensor(tmp_path):
    """restore and stored_tensors read a stored tensor in slices along its first axis (no whole copy of a
    token embedding); the slices put together are the tensor, for any slice size, 0-d and empty tensors too."""
    from safetensors.torch import save_file

    from intertwiners.alignment.streaming import read_slices

    tensors = {"w": torch.randn(7, 3, 2), "b": torch.randn(5), "s": torch.tensor(2.5), "e": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "t.safetensors")
    for chunk in (1, 5, 6, 1 << 22):
        for k, t in tensors.items():
            parts = list(read_slices(tmp_path / "t.safetensors", k, chunk))
            if t.ndim == 0:
                assert len(parts) == 1 and torch.equal(parts[0][1], t)
                continue
            assert [i for i, _ in parts] == sorted(i for i, _ in parts)
            got = torch.cat([p for _, p in parts]) if parts else torch.zeros(0, *t.shape[1:])
            assert torch.equal(got, t), (k, chunk)
            if chunk == 5 and k == "w":
                assert len(parts) == 7  # six entries per row: one row per slice
