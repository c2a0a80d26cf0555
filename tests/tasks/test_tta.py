"""Test-time views of a classifier: the shifted and mirrored images `classify_logits` averages, and the views a
checkpoint records, which `vitkit eval`, `predict` and `serve` use."""
import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit.errors import CheckpointError
from vitkit.tasks.classify import classify_logits, predict, shift_image, tta_of, tta_view_count, zoom_image


def test_shift_image_moves_the_content_and_reflects_the_border():
    x = torch.arange(2 * 3 * 6 * 7, dtype=torch.float32).view(2, 3, 6, 7)
    right = shift_image(x, 1, 0, 2)
    assert right.shape == x.shape
    assert torch.equal(right[..., :, 2:], x[..., :, :-2])  # the content moved 2 px right
    assert torch.equal(right[..., :, 0], x[..., :, 2]) and torch.equal(right[..., :, 1], x[..., :, 1])  # reflected
    up = shift_image(x, 0, -1, 2)
    assert torch.equal(up[..., :-2, :], x[..., 2:, :]) and torch.equal(up[..., -1, :], x[..., -3, :])
    assert torch.equal(shift_image(x, 1, 0, 50)[..., 5:], x[..., :2])  # at most the shorter side - 1 (6 - 1)


class _Pixels(torch.nn.Module):
    """Logits that depend on where things are: a fixed linear map of the raw pixels."""

    def __init__(self, c=1, s=5, k=3):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(c * s * s, k, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return x.flatten(1) @ self.w


def _manual(model, x, flip, shift, zoom=()):
    """The definition, written out with numpy's reflection padding and PIL-free bilinear sampling by hand."""
    views = [x] + [_zoom_by_hand(x, z) for z in zoom]
    if shift:
        a = np.pad(x.numpy(), ((0, 0), (0, 0), (shift, shift), (shift, shift)), mode="reflect")
        h, w = x.shape[-2:]
        for dy, dx in ((0, shift), (0, -shift), (shift, 0), (-shift, 0)):
            views.append(torch.from_numpy(a[..., shift - dy:shift - dy + h, shift - dx:shift - dx + w].copy()))
    if flip:
        views += [torch.from_numpy(v.numpy()[..., ::-1].copy()) for v in views]
    p = torch.stack([model(v).softmax(-1) for v in views]).mean(0)
    return p.log(), len(views)


def _zoom_by_hand(x, z):
    """Bilinear sampling of the centre 1/z: output pixel centre u (in [-1, 1]) reads input position u / z."""
    n = x.shape[-1]
    u = (torch.arange(n, dtype=torch.float64) * 2 + 1) / n - 1  # pixel centres, align_corners=False
    src = ((u / z) + 1) * n / 2 - 0.5  # in input pixel units
    lo = src.floor().long().clamp(0, n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    w = (src - src.floor()).float()
    rows = x[..., lo, :] * (1 - w)[:, None] + x[..., hi, :] * w[:, None]
    return rows[..., lo] * (1 - w) + rows[..., hi] * w


def test_zoom_image_enlarges_the_centre():
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(zoom_image(x, 1.0), x)
    torch.testing.assert_close(zoom_image(x, 1.2), _zoom_by_hand(x, 1.2), rtol=1e-5, atol=1e-5)
    assert torch.equal(zoom_image(x, 1.2)[..., 4, 4], x[..., 4, 4])  # the centre pixel stays where it is
    ramp = torch.arange(9.0).expand(1, 1, 9, 9)  # a horizontal ramp gets steeper by the factor
    z = zoom_image(ramp, 1.5)[0, 0, 0]
    torch.testing.assert_close(z[5] - z[4], torch.tensor(1 / 1.5))


@pytest.mark.parametrize("flip,shift,zoom", [(False, 0, ()), (True, 0, ()), (False, 1, ()), (True, 2, ()),
                                             (False, 0, (1.1, 1.2)), (True, 1, (1.2,))])
def test_classify_logits_averages_the_class_probabilities_of_every_view(flip, shift, zoom):
    model, x = _Pixels(), torch.randn(4, 1, 5, 5, generator=torch.Generator().manual_seed(1))
    want, n = _manual(model, x, flip, shift, zoom)
    got = classify_logits(model, x, flip, shift, zoom)
    assert n == tta_view_count(flip, shift, zoom)
    if n == 1:
        assert torch.equal(got, model(x))  # no views: the logits themselves
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got.softmax(-1), model(x).softmax(-1), atol=1e-3)  # the views change the scores


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """One classifier saved twice: without test-time views, and recording 2-px shifts; and three images."""
    root = tmp_path_factory.mktemp("tta")
    torch.manual_seed(0)
    model = vitkit.create_model("vit_mini_patch7_28", embed_dim=16, depth=1, num_heads=2, num_classes=3)
    names = ["a", "b", "c"]
    vitkit.save(model, root / "plain.safetensors", class_names=names, pretrained_cfg={"dataset": "digits"})
    vitkit.save(model, root / "shift.safetensors", class_names=names,
                pretrained_cfg={"dataset": "digits", "tta_flip": False, "tta_shift": 2})
    vitkit.save(model, root / "zoom.safetensors", class_names=names,
                pretrained_cfg={"dataset": "digits", "tta_flip": True, "tta_zoom": [1.1, 1.2]})
    vitkit.save(model, root / "bad.safetensors", class_names=names,
                pretrained_cfg={"dataset": "digits", "tta_shift": "two"})
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((28, 28)) * 255).astype(np.uint8)).save(root / f"{i}.png")
    return root


def test_predict_averages_the_views_the_checkpoint_records(shifted):
    from vitkit.data import eval_transform
    from vitkit.data.images import read_image
    from vitkit.models import Preprocessing

    imgs = [shifted / f"{i}.png" for i in range(3)]
    plain = predict(shifted / "plain.safetensors", imgs, topk=3)
    for name, views in (("shift", (False, 2, ())), ("zoom", (True, 0, (1.1, 1.2)))):
        scored = predict(shifted / f"{name}.safetensors", imgs, topk=3)
        model = vitkit.load(shifted / f"{name}.safetensors").eval()
        tf = eval_transform(Preprocessing.of(model), model.config.img_size)
        x = torch.stack([tf(read_image(p, 1)) for p in imgs])
        with torch.no_grad():
            want = classify_logits(model, x, *views).softmax(-1)
        for r, w, p in zip(scored, want, plain):
            got = {t["label"]: t["prob"] for t in r["topk"]}
            assert [got[n] for n in "abc"] == pytest.approx(w.tolist(), abs=1e-5)
            assert got != {t["label"]: t["prob"] for t in p["topk"]}  # the plain checkpoint scores the image alone


def test_a_damaged_shift_record_is_refused_in_one_line(shifted):
    with pytest.raises(CheckpointError, match=r"tta_shift 'two', not a pixel count >= 0; the checkpoint is damaged"):
        predict(shifted / "bad.safetensors", [shifted / "0.png"])
    assert tta_of({}) == (False, 0, ()) and tta_of({"tta_flip": True, "tta_shift": 3}) == (True, 3, ())
    assert tta_of({"tta_zoom": [1.1, 1.2]}) == (False, 0, (1.1, 1.2))
    with pytest.raises(CheckpointError, match="tta_shift -1"):
        tta_of({"tta_shift": -1})
    for bad in (0.9, [0.9], ["x"], [3.0]):
        with pytest.raises(CheckpointError, match=r"records tta_zoom .*, not a list of factors in \(1, 2\]"):
            tta_of({"tta_zoom": bad})


def test_the_budget_counts_every_view_of_an_evaluation():
    """Before the first evaluation is timed, and for the report's fp32 re-evaluation: a forward per view."""
    from vitkit.tasks.classify import _report_seconds
    from vitkit.tasks.plan import Plan
    from vitkit.tasks.recipe import Recipe
    from vitkit.train.budget import guess_eval_secs

    one = guess_eval_secs([0.3] * 5, 1000, 100) - 0.5
    assert guess_eval_secs([0.3] * 5, 1000, 100, views=10) - 0.5 == pytest.approx(10 * one)
    plan = Plan(Recipe())
    plan.measurements["precision_seconds"] = {"fp32": 0.3, "bf16": 0.2}
    alone = _report_seconds(plan, Recipe(precision="bf16", batch_size=100), 1000) - 3.0
    views = _report_seconds(plan, Recipe(precision="bf16", batch_size=100, tta_flip=True, tta_shift=2), 1000) - 3.0
    zoomed = _report_seconds(plan, Recipe(precision="bf16", batch_size=100, tta_flip=True, tta_zoom=(1.1, 1.2)),
                             1000) - 3.0
    assert alone == pytest.approx(1.0) and views == pytest.approx(10.0) and zoomed == pytest.approx(6.0)
