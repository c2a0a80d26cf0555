"""Attention maps: rollout against a direct implementation of the paper's recipe, read-out for every kind of
model (class token, registers, average pooling, non-square inputs), the CLI, and the pointing test."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vitkit
from vitkit.cli import main
from vitkit.errors import ConfigError
from vitkit.tasks.explain import attention_rollout, explain, fuse_heads

from ._digits import mnist5k, write_digits

ROOT = Path(__file__).resolve().parents[2]


def _naive_rollout(attns, fusion, discard):
    """Abnar & Zuidema's rollout with jacobgil/vit-explain's head fusion and discard, one sample, in numpy."""
    out = None
    for a in attns:
        a = {"mean": a.mean(0), "max": a.max(0), "min": a.min(0)}[fusion].copy()
        n = a.shape[0]
        flat = a.reshape(-1)
        low = np.argsort(flat, kind="stable")[: int(n * n * discard)]
        low = low[low != 0]
        flat[low] = 0
        a = flat.reshape(n, n)
        a = (a + np.eye(n)) / 2
        a = a / a.sum(-1, keepdims=True)
        out = a if out is None else a @ out
    return out


@pytest.mark.parametrize("fusion,discard", [("mean", 0.0), ("max", 0.9), ("min", 0.5)])
def test_rollout_matches_a_direct_implementation(fusion, discard):
    g = torch.Generator().manual_seed(0)
    attns = [torch.rand(2, 3, 7, 7, generator=g).softmax(-1).double() for _ in range(4)]
    got = attention_rollout(attns, fusion, discard)
    for b in range(2):
        ref = _naive_rollout([a[b].numpy() for a in attns], fusion, discard)
        np.testing.assert_allclose(got[b].numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1).numpy(), 1.0, atol=1e-6)  # rows stay distributions


def test_rollout_of_uniform_attention_is_uniform_and_bad_options_are_refused():
    attns = [torch.full((1, 2, 5, 5), 0.2) for _ in range(3)]
    np.testing.assert_allclose(attention_rollout(attns)[0, 0, 1:].numpy(), attention_rollout(attns)[0, 0, 1].item())
    with pytest.raises(ConfigError):
        fuse_heads(attns[0], "median")
    with pytest.raises(ConfigError):
        attention_rollout(attns, discard_ratio=1.0)


def test_maps_with_registers_non_square_inputs_and_average_pooling():
    x = torch.randn(2, 1, 28, 42)  # a 4 x 6 patch grid
    reg = vitkit.create_model("vit_mini_patch7_28", reg_tokens=2, depth=2).eval()
    e = explain(reg, x, "rollout")
    assert e.grid == (4, 6) and e.map.shape == (2, 4, 6) and e.heads.shape == (2, 4, 4, 6)
    assert "register" in e.meaning
    # the class token's row over the patch columns (prefix = class + 2 registers)
    _, attns = reg(x, return_attention=True)
    torch.testing.assert_close(e.map.reshape(2, -1), attention_rollout(attns)[:, 0, 3:])
    torch.testing.assert_close(explain(reg, x, "attention").heads.reshape(2, 4, -1), attns[-1][:, :, 0, 3:])
    avg = vitkit.create_model("vit_mini_patch7_28", class_token=False, global_pool="avg", depth=2).eval()
    e = explain(avg, x, "attention")
    assert "no class token" in e.meaning and "mean" in e.meaning
    _, attns = avg(x, return_attention=True)
    torch.testing.assert_close(e.heads.reshape(2, 4, -1), attns[-1].mean(dim=2))  # mean attention received
    assert explain(avg, x, "rollout").map.shape == (2, 4, 6)
    # an average-pool model that keeps a class token (as `vitkit train` makes them) is read like one without
    avgc = vitkit.create_model("vit_mini_patch7_28", global_pool="avg", reg_tokens=1, depth=2).eval()
    e = explain(avgc, x, "rollout")
    assert "ignores its class token" in e.meaning
    _, attns = avgc(x, return_attention=True)
    torch.testing.assert_close(e.map.reshape(2, -1), attention_rollout(attns)[:, 2:, 2:].mean(dim=1))
    with pytest.raises(ConfigError):
        explain(avg, x, "gradcam")


def test_explain_cli_writes_png_and_scores(tmp_path, capsys, digits_model):
    _, (xte, yte) = mnist5k()
    paths = write_digits(tmp_path / "img", xte[:2], yte[:2])
    from PIL import Image
    wide = tmp_path / "wide.png"  # a non-square image at its own size: 28 x 61 → 28 x 56 → a 4 x 8 grid
    Image.new("L", (61, 28)).save(wide)
    out = tmp_path / "maps"
    assert main(["explain", str(digits_model), str(paths[0]), str(paths[1]), "--out", str(out)]) == 0
    rows = json.loads(capsys.readouterr().out)
    from vitkit.data.inputs import load_batch
    model = vitkit.load(digits_model)
    with torch.no_grad():
        expect = model(load_batch(paths[:2], model)).argmax(1)
    assert [r["predicted"] for r in rows] == [str(int(v)) for v in expect]  # class names from the checkpoint
    doc = json.loads(Path(rows[0]["scores"]).read_text())
    assert np.array(doc["map"]).shape == (4, 4) and np.array(doc["heads"]).shape == (4, 4, 4)
    assert Path(rows[0]["png"]).read_bytes()[:4] == b"\x89PNG"
    assert main(["explain", str(digits_model), str(wide), "--size", "native", "--method", "attention",
                 "--format", "npy", "--out", str(out)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert np.load(rows[0]["scores"]).shape == (4, 8) and rows[0]["grid"] == [4, 8]
    Image.new("L", (5, 5)).save(tmp_path / "tiny.png")
    assert main(["explain", str(digits_model), str(tmp_path / "tiny.png"), "--size", "native",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "smaller than one 7x7 patch" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["explain", str(digits_model), str(tmp_path / "x.jpg"), "--out", str(out)]) == 2
    assert "cannot read image" in capsys.readouterr().err


def _share_in_box(e, boxes, patch):
    """The share of each map's mass on the patches whose centres lie inside the sample's box (energy pointing)."""
    m = e.map.clamp(min=0).numpy()
    centres = (np.arange(m.shape[1]) + 0.5) * patch
    inside = np.stack([np.outer((centres >= b[0]) & (centres < b[2]), (centres >= b[1]) & (centres < b[3]))
                       for b in boxes])
    return float(((m * inside).sum((1, 2)) / m.sum((1, 2))).mean())


def test_pointing_rollout_peaks_inside_the_digit(tmp_path):
    """A ViT trained (briefly) on digits pasted at random places on blank 64x64 canvases: the peak of its rollout
    map lies inside the digit's box in >= 90% of held-out canvases (chance ~20%). An untrained model's peak does
    too (the digit is the only thing on the canvas), so what tells learning apart is how much of the map lies on
    the digit: ~20% (the box's share of the canvas) untrained, about half once trained. The same peaks read with
    rows and columns swapped miss far more often, so a map laid out wrong would fail here."""
    spec = importlib.util.spec_from_file_location("pointing", ROOT / "benchmarks" / "pointing.py")
    pointing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pointing)
    res = pointing.main(["--quick", "--save", str(tmp_path / "pointing.safetensors")])
    assert res["rollout"] >= 0.9 and res["chance"] < 0.3, res
    x, _, boxes = pointing.canvas_digits(300, seed=5, offset=4000)
    x = (x - 0.5) / 0.5
    torch.manual_seed(0)
    untrained = pointing.build_model().eval()
    trained = vitkit.load(tmp_path / "pointing.safetensors")
    with torch.no_grad():
        e_untrained, e_trained = explain(untrained, x), explain(trained, x)
    share = {"untrained": _share_in_box(e_untrained, boxes, pointing.PATCH),
             "trained": _share_in_box(e_trained, boxes, pointing.PATCH)}
    assert share["trained"] > share["untrained"] + 0.15 and share["untrained"] < 0.3, share
    peaks = e_untrained.peaks()
    hits = pointing.in_box(peaks, boxes).mean()
    swapped = pointing.in_box([(c, r) for r, c in peaks], boxes).mean()
    assert hits - swapped > 0.3, (hits, swapped)


def test_explain_outputs_never_collide_and_others_are_not_replaced(tmp_path, capsys, digits_model):
    """a/x.png and b/x.png keep their relative paths (both kept, not one lost); an output another image made is
    refused without --overwrite; re-explaining the same image replaces its own files."""
    _, (xte, yte) = mnist5k()
    from PIL import Image

    for name, i in (("a", 0), ("b", 1), ("c", 2)):
        (tmp_path / name).mkdir()
        Image.fromarray((xte[i, 0].numpy() * 255).astype(np.uint8), "L").save(tmp_path / name / "x.png")
    out = tmp_path / "maps"
    a, b, c = (str(tmp_path / n / "x.png") for n in "abc")
    assert main(["explain", str(digits_model), a, b, "--out", str(out)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [Path(r["png"]) for r in rows] == [out / "a" / "x.png", out / "b" / "x.png"]
    assert [json.loads(Path(r["scores"]).read_text())["image"] for r in rows] == [a, b]
    assert main(["explain", str(digits_model), a, "--out", str(out)]) == 0  # alone: maps/x.png, owned by a
    capsys.readouterr()
    before = (out / "x.json").read_text()
    assert main(["explain", str(digits_model), c, "--out", str(out)]) == 2  # c/x.png would replace a's
    err = capsys.readouterr().err
    assert "--overwrite" in err and "a/x.png" in err and len(err.strip().splitlines()) == 1
    assert (out / "x.json").read_text() == before
    assert main(["explain", str(digits_model), a, "--out", str(out)]) == 0  # its own files: replaced quietly
    assert main(["explain", str(digits_model), c, "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    assert json.loads((out / "x.json").read_text())["image"] == c


def test_explicit_attention_is_computed_in_bounded_blocks_and_matches(monkeypatch):
    """With a small block budget the explicit path hands over (B, heads, rows, N) blocks no bigger than the budget,
    and the logits, the attention and the maps equal the one-block computation."""
    import vitkit.models.vit as vit

    torch.manual_seed(0)
    model = vitkit.create_model("vit_mini_patch7_28", reg_tokens=1, depth=3).eval()
    x = torch.randn(2, 1, 42, 35)  # 6 x 5 patches + 2 prefix tokens = 32 tokens
    with torch.no_grad():
        ref_logits, ref_attns = model(x, return_attention=True)
    ref = {m: explain(model, x, m, "max", 0.5) for m in ("rollout", "attention")}
    heads, N = 4, 32
    budget = 2 * heads * 5 * N  # five query rows per block
    monkeypatch.setattr(vit, "ATTN_BLOCK_ELEMENTS", budget)
    seen = []
    with torch.no_grad():
        logits = model.forward_attention(x, lambda i, p, r0: seen.append((i, tuple(p.shape), r0)))
        _, attns = model(x, return_attention=True)
    assert max(s[1][2] for s in seen) == 5 and all(2 * heads * s[1][2] * N <= budget for s in seen)
    assert [s[2] for s in seen if s[0] == 0] == [0, 5, 10, 15, 20, 25, 30]
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=1e-5)
    for a, b in zip(attns, ref_attns):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for m, e in ref.items():
        got = explain(model, x, m, "max", 0.5)
        torch.testing.assert_close(got.map, e.map, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.heads, e.heads, atol=1e-6, rtol=1e-5)
    avg = vitkit.create_model("vit_mini_patch7_28", class_token=False, global_pool="avg", depth=2).eval()
    with torch.no_grad():
        _, a = avg(x, return_attention=True)
    torch.testing.assert_close(explain(avg, x, "attention").heads.reshape(2, 4, -1), a[-1].mean(dim=2))


def test_explain_refuses_inputs_above_the_token_cap(tmp_path, capsys, digits_model):
    """A native-size image far above the cap is refused with one line naming the cap and the flag, before it is
    preprocessed; the flag lifts it."""
    from PIL import Image

    from vitkit.tasks.explain import check_tokens

    model = vitkit.create_model("vit_mini_patch7_28")
    with pytest.raises(ConfigError, match=r"65 tokens, above the attention-map cap of 64.*--max-tokens 65"):
        explain(model, torch.randn(1, 1, 56, 56), max_tokens=64)
    check_tokens(model, (56, 56), 65)
    Image.new("L", (700, 700), 128).save(tmp_path / "big.png")  # 100 x 100 patches of 7: 10,001 tokens
    calls = []
    import vitkit.data.inputs as images

    real = images.load_batch
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(images, "load_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        code = main(["explain", str(digits_model), str(tmp_path / "big.png"), "--size", "native",
                     "--out", str(tmp_path / "maps")])
    finally:
        monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 2 and calls == [] and len(err.strip().splitlines()) == 1
    assert "10001 tokens" in err and "cap of 4096" in err and "--max-tokens 10001" in err
    Image.new("L", (70, 70), 128).save(tmp_path / "mid.png")  # 101 tokens: allowed with a raised cap only
    assert main(["explain", str(digits_model), str(tmp_path / "mid.png"), "--size", "native", "--max-tokens", "100",
                 "--out", str(tmp_path / "maps")]) == 2
    assert main(["explain", str(digits_model), str(tmp_path / "mid.png"), "--size", "native", "--max-tokens", "101",
                 "--out", str(tmp_path / "maps")]) == 0
