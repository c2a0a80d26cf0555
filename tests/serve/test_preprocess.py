"""Requests decode to uint8 pixels and the model worker scales a whole batch: bit for bit what `eval_transform`
(vitkit predict's preprocessing) gives per image."""
import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data import eval_transform
from vitkit.models import Preprocessing
from vitkit.serve.model import _split_scaling


@pytest.mark.parametrize("channels,pre", [
    (3, Preprocessing(input_size=(3, 224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                      crop_pct=0.9, interpolation="bicubic")),
    (1, Preprocessing(input_size=(1, 28, 28), mean=(0.1307,), std=(0.3081,), crop_pct=1.0,
                      interpolation="bilinear")),
])
def test_batched_scaling_equals_the_per_image_transform(channels, pre):
    t = eval_transform(pre)
    pixels, scaling = _split_scaling(t)
    rng = np.random.default_rng(0)
    shape = (41, 37) if channels == 1 else (300, 260, 3)
    ims = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(5)]
    ref = torch.stack([t(im) for im in ims])
    u = torch.stack([pixels(im) for im in ims])
    assert u.dtype == torch.uint8 and u.shape == ref.shape
    assert torch.equal(scaling(u), ref)                                  # a batch at once
    assert torch.equal(torch.stack([scaling(pixels(im)) for im in ims]), ref)  # or one by one


def test_a_transform_of_another_shape_stays_whole():
    def whole(im):
        return torch.zeros(1)

    pixels, scaling = _split_scaling(whole)
    x = torch.ones(2)
    assert pixels is whole and scaling(x) is x
