"""Preprocessing: the one reader and writer of a checkpoint's `pretrained_cfg`, and normalize/denormalize."""
import json

import pytest
import torch

import vitkit
from vitkit.io.checkpoint import read_metadata
from vitkit.models import Preprocessing, create_model, denormalize, normalize


def _model(**kw):
    return create_model("", img_size=28, patch_size=7, in_chans=1, embed_dim=16, depth=1, num_heads=2,
                        num_classes=3, **kw)


# what vitkit wrote for these models before Preprocessing existed (key order included): the format stays
WRITTEN = {
    "nothing recorded": (None, '{"mean": [0.5], "std": [0.5], "interpolation": "bicubic", "crop_pct": 1.0, '
                               '"input_size": [1, 28, 28], "class_names": null}'),
    "classifier": ({"class_names": ["a", "b", "c"], "mean": [0.1307], "std": [0.3081], "input_size": [1, 28, 28],
                    "interpolation": "bicubic", "crop_pct": 1.0, "dataset": "mnist5k", "tta_flip": True},
                   '{"mean": [0.1307], "std": [0.3081], "interpolation": "bicubic", "crop_pct": 1.0, '
                   '"input_size": [1, 28, 28], "class_names": ["a", "b", "c"], "dataset": "mnist5k", '
                   '"tta_flip": true}'),
    "mae": ({"class_names": None, "mean": [0.13], "std": [0.31], "input_size": [1, 28, 28],
             "interpolation": "bilinear", "crop_pct": 1.0, "dataset": "mnist5k"},
            '{"mean": [0.13], "std": [0.31], "interpolation": "bilinear", "crop_pct": 1.0, '
            '"input_size": [1, 28, 28], "class_names": null, "dataset": "mnist5k"}'),
    "generator": ({"class_names": ["0", "1", "2"], "mean": [0.5], "std": [0.5], "dataset": "digits",
                   "objective": "flow"},
                  '{"mean": [0.5], "std": [0.5], "interpolation": "bicubic", "crop_pct": 1.0, '
                  '"input_size": [1, 28, 28], "class_names": ["0", "1", "2"], "dataset": "digits", '
                  '"objective": "flow"}'),
    "integers and extras": ({"mean": [0.4], "std": [1], "foo": "bar", "source_format": "timm", "crop_pct": 0.875},
                            '{"mean": [0.4], "std": [1], "interpolation": "bicubic", "crop_pct": 0.875, '
                            '"input_size": [1, 28, 28], "class_names": null, "foo": "bar", "source_format": "timm"}'),
}


@pytest.mark.parametrize("case", sorted(WRITTEN))
def test_checkpoint_metadata_round_trips_byte_for_byte(tmp_path, case):
    """save writes today's bytes, and from_dict → to_dict gives them back exactly (with and without the config)."""
    recorded, expected = WRITTEN[case]
    model = _model()
    if recorded is not None:
        model.pretrained_cfg = recorded
    vitkit.save(model, tmp_path / "m.safetensors")
    text = read_metadata(tmp_path / "m.safetensors")["pretrained_cfg"]
    assert text == expected
    for config in (model.config, None):
        assert json.dumps(Preprocessing.from_dict(json.loads(text), config).to_dict()) == text
    assert vitkit.load(tmp_path / "m.safetensors").pretrained_cfg == json.loads(text)


@pytest.mark.parametrize("older", [{}, None, {"mean": [0.1307], "std": [0.3081]}, {"class_names": ["a"]},
                                   {"mean": None, "std": None, "interpolation": None, "crop_pct": None,
                                    "input_size": None}, {"dataset": "mnist5k"}])
def test_older_metadata_reads_with_the_defaults(older):
    """Missing or null entries (older or hand-made metadata) take the documented defaults for the model."""
    pre = Preprocessing.from_dict(older, _model().config)
    given = older or {}
    assert pre.mean == tuple(given.get("mean") or [0.5]) and pre.std == tuple(given.get("std") or [0.5])
    assert (pre.interpolation, pre.crop_pct, pre.input_size) == ("bicubic", 1.0, (1, 28, 28))
    assert pre.class_names == (tuple(given["class_names"]) if given.get("class_names") else None)
    assert dict(pre.extra) == {k: v for k, v in given.items() if k == "dataset"}
    assert list(pre.to_dict())[:6] == ["mean", "std", "interpolation", "crop_pct", "input_size", "class_names"]


def test_defaults_follow_the_model():
    model = create_model("", img_size=(32, 48), patch_size=16, embed_dim=16, depth=1, num_heads=2)
    pre = Preprocessing.of(model)
    assert pre.mean == pre.std == (0.5, 0.5, 0.5) and pre.input_size == (3, 32, 48) and pre.size == (32, 48)
    model.pretrained_cfg = {"input_size": [3, 64, 64], "crop_pct": 0.9}
    assert Preprocessing.of(model).size == (64, 64) and Preprocessing.of(model).crop_pct == 0.9


@pytest.mark.parametrize("entry", [("mean", []), ("mean", ["x"]), ("mean", [0.5, 0.5]), ("std", [0]),
                                   ("input_size", [1, 2]), ("input_size", "x"), ("crop_pct", 0), ("crop_pct", 1.5),
                                   ("interpolation", "x")])
def test_unusable_entries_are_refused_by_name(entry):
    k, v = entry
    with pytest.raises(ValueError, match=f"pretrained_cfg {k}"):
        Preprocessing.from_dict({k: v}, _model().config)
    with pytest.raises(ValueError, match="not a dict"):
        Preprocessing.from_dict("x")


def test_normalize_and_denormalize_are_the_checkpoint_statistics():
    """(x - mean) / std per channel, for one image (C, H, W) or a batch (B, C, H, W), and its inverse."""
    pre = Preprocessing(mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    x = torch.rand(2, 3, 4, 5)
    mean, std = torch.tensor(pre.mean).view(1, -1, 1, 1), torch.tensor(pre.std).view(1, -1, 1, 1)
    assert torch.equal(normalize(x, pre), (x - mean) / std)
    assert torch.equal(normalize(x[0], pre), ((x - mean) / std)[0])
    assert torch.equal(denormalize(x, pre), x * std + mean)
    assert torch.allclose(denormalize(normalize(x, pre), pre), x, atol=1e-6)
    one = Preprocessing(mean=(0.5,), std=(0.5,))  # one statistic for every channel
    assert torch.equal(normalize(x, one), (x - 0.5) / 0.5)
