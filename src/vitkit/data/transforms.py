"""Train and eval transforms.

In-memory datasets use *batch* transforms: `t(x_uint8 (b, C, H, W), gen, lo, B) -> float (b, C, S, S)`, where
`gen` is a torch.Generator seeded per (seed, epoch, step) and `[lo, lo + b)` is this process's slice of the global
batch of size B. Random parameters are drawn for all B images and then sliced, so 1 process and N processes see
exactly the same augmented images (the distributed test relies on it), and a resumed run sees the same as an
uninterrupted one. Folder datasets use per-sample torchvision.transforms.v2 pipelines on PIL images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..models.preprocessing import Preprocessing

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
HALF_MEAN, HALF_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _pair(s) -> Tuple[int, int]:
    return (int(s), int(s)) if isinstance(s, int) else (int(s[0]), int(s[1]))


def _uniform(gen, n, lo, hi):
    return torch.rand(n, generator=gen) * (hi - lo) + lo


@dataclass
class AugmentConfig:
    """Random affine per image (rotation, scale, translation, shear, flip), then optional RandAugment-style colour
    and geometry ops and random erasing. Digits: no flips. `level='none'` turns all of it off."""

    rotate: float = 0.0  # degrees, ±
    scale: Tuple[float, float] = (1.0, 1.0)
    translate: float = 0.0  # fraction of the size, ±
    shear: float = 0.0  # degrees, ±
    hflip: bool = False
    trivial_augment: bool = False  # per-image TrivialAugmentWide (file datasets); batches use `rand_ops` instead
    erase: float = 0.0  # probability of random erasing
    rand_ops: int = 0  # batch RandAugment: ops per image (1 = TrivialAugment-like, 2 = RandAugment); 0 = off
    rand_magnitude: float = 1.0  # the largest op strength, in [0, 1]; each image draws its own in [0, this]
    ramp: float = 0.0  # > 0: the strength of rand ops, erasing and MixUp/CutMix grows linearly from 0 to full
    #                    over this fraction of the schedule (weak augmentation while the model is still weak)

    def strength(self, progress: float) -> float:
        """How much of the configured augmentation applies at `progress` (0 = start, 1 = end of training)."""
        return 1.0 if self.ramp <= 0 else float(min(1.0, max(0.0, progress) / self.ramp))


def default_augment(kind: str, level: str = "default") -> AugmentConfig:
    """The augmentation recipe per kind of data; `level` is 'none', 'light' or 'default'/'strong'."""
    if level not in ("none", "light", "default", "strong"):
        raise ConfigError(f"--augment must be none, light, default or strong, got {level!r}")
    if level == "none":
        return AugmentConfig()
    if kind in ("oriented", "digits"):  # no flips: the mirror image is another thing (a '2' is not a mirrored '5')
        if level == "light":
            return AugmentConfig(rotate=8, scale=(0.95, 1.05), translate=0.08)
        if level == "strong":
            return AugmentConfig(rotate=15, scale=(0.85, 1.15), translate=0.12, shear=10, erase=0.25)
        return AugmentConfig(rotate=12, scale=(0.9, 1.1), translate=0.1, shear=8)
    if level == "light":
        return AugmentConfig(translate=0.125, hflip=True)
    if level == "strong":
        return AugmentConfig(translate=0.125, scale=(0.8, 1.2), hflip=True, trivial_augment=True, erase=0.25,
                             rand_ops=2)
    return AugmentConfig(translate=0.125, scale=(0.9, 1.1), hflip=True, trivial_augment=True, rand_ops=1)


class BatchTransform:
    """uint8 batch (b, C, H, W) → normalised float (b, C, S, S), augmented when `aug` is given (train).

    `min_size` (progressive resolution): the output side grows from `min_size` to `size` over the first 3/4 of the
    schedule (in steps of `multiple`, e.g. the patch size), then stays at `size`; `progress` in [0, 1] says where
    in the schedule a batch is. It also scales the augmentation strength when `aug.ramp` is set."""

    def __init__(self, size, mean: Sequence[float], std: Sequence[float], aug: Optional[AugmentConfig] = None,
                 min_size: Optional[int] = None, multiple: int = 1, crop_pct: float = 1.0):
        self.size = _pair(size)
        self.crop_pct = crop_pct  # eval: the centre crop_pct of the image, resized to `size` (timm's eval crop)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.aug = aug
        self.min_size, self.multiple = min_size, max(1, int(multiple))

    def size_at(self, progress: float) -> Tuple[int, int]:
        """The output size at `progress`: `size`, or during progressive resizing a smaller multiple of `multiple`."""
        if not self.min_size or self.min_size >= min(self.size):
            return self.size
        t = min(1.0, max(0.0, progress) / PROGRESSIVE_END)
        side = self.min_size + t * (min(self.size) - self.min_size)
        side = max(self.multiple, int(side // self.multiple) * self.multiple)
        scale = side / min(self.size)
        return (int(round(self.size[0] * scale / self.multiple)) * self.multiple,
                int(round(self.size[1] * scale / self.multiple)) * self.multiple)

    def __call__(self, x: torch.Tensor, gen: torch.Generator, lo: Union[int, torch.Tensor] = 0,
                 B: Optional[int] = None, progress: float = 1.0) -> torch.Tensor:
        """`x` is images lo..lo+b-1 of a global batch of B (or, `lo` a tensor, the images at those places of it):
        each image's random draws are its place's, whichever process holds it."""
        b = x.shape[0]
        B = b if B is None else B
        sl = lo if isinstance(lo, torch.Tensor) else slice(lo, lo + b)
        a = self.aug
        size = self.size_at(progress) if a is not None else self.size
        strength = a.strength(progress) if a is not None else 0.0
        x = x.float().div_(255.0)
        if self.crop_pct < 1.0:
            h, w = x.shape[-2:]
            ch, cw = max(1, round(h * self.crop_pct)), max(1, round(w * self.crop_pct))
            x = x[..., (h - ch) // 2:(h - ch) // 2 + ch, (w - cw) // 2:(w - cw) // 2 + cw]
        geo = None
        if a is not None and a.rand_ops > 0:
            x, geo = _rand_augment(x, B, sl, a.rand_ops, a.rand_magnitude * strength, gen)
        if a is not None and (a.rotate or a.translate or a.shear or a.hflip or a.scale != (1.0, 1.0) or geo is not None):
            theta = _affine_params(B, a, gen, geo)[sl]
            grid = F.affine_grid(theta, [b, x.shape[1], *size], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        elif tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        x = (x - self.mean) / self.std
        if a is not None and a.erase > 0:
            x = _random_erase(x, B, sl, a.erase * strength, gen)
        return x


PROGRESSIVE_END = 0.75  # progressive resizing reaches the full size at this point of the schedule


# ---- batch RandAugment ------------------------------------------------------------------------------------------
# Colour ops on float images in [0, 1], each (x (n, C, H, W), m (n,) strength in [0, 1], sign (n,) ±1) → x. The
# geometric ops (rotate, shear, translate) join the random affine instead of resampling the image twice.
def _blend(x, other, factor):
    return (other + (x - other) * factor.view(-1, 1, 1, 1)).clamp_(0, 1)


def _grey(x):
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def _op_brightness(x, m, sign):
    return _blend(x, torch.zeros_like(x), 1 + 0.9 * m * sign)


def _op_contrast(x, m, sign):
    return _blend(x, _grey(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), 1 + 0.9 * m * sign)


def _op_color(x, m, sign):
    return _blend(x, _grey(x), 1 + 0.9 * m * sign)


def _op_sharpness(x, m, sign):
    k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13  # PIL's SMOOTH filter
    c = x.shape[1]
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.view(1, 1, 3, 3).repeat(c, 1, 1, 1), groups=c)
    return _blend(x, blurred, 1 + 0.9 * m * sign)


def _op_posterize(x, m, sign):
    shift = (4 * m).round().view(-1, 1, 1, 1)  # drop up to 4 of the 8 bits
    q = torch.pow(2.0, shift)
    return torch.floor(x * 255 / q) * q / 255


def _op_solarize(x, m, sign):
    thr = (1 - m).view(-1, 1, 1, 1)
    return torch.where(x >= thr, 1 - x, x)


def _op_autocontrast(x, m, sign):
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(hi > lo, 1 / (hi - lo).clamp(min=1e-6), torch.ones_like(hi))
    return torch.where(hi > lo, (x - lo) * scale, x).clamp_(0, 1)


def _op_equalize(x, m, sign):
    from torchvision.transforms.v2 import functional as TF

    return TF.equalize((x * 255).round().to(torch.uint8)).float() / 255


COLOUR_OPS = (_op_brightness, _op_contrast, _op_color, _op_sharpness, _op_posterize, _op_solarize,
              _op_autocontrast, _op_equalize)
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_ALL_OPS = len(COLOUR_OPS) + len(GEOMETRIC_OPS) + 1  # + identity


def _rand_augment(x: torch.Tensor, B: int, sl: slice, num_ops: int, magnitude: float, gen: torch.Generator):
    """Each image takes `num_ops` ops drawn uniformly (with identity) and a strength uniform in [0, magnitude]
    (TrivialAugment's random magnitude). Draws are made for the global batch B and sliced (exact under DDP).
    Returns the colour-augmented batch and the geometric parameters for the affine (or None)."""
    picks = torch.randint(0, _ALL_OPS, (B, num_ops), generator=gen)
    mags = torch.rand(B, num_ops, generator=gen) * magnitude
    signs = (torch.randint(0, 2, (B, num_ops), generator=gen) * 2 - 1).float()
    if magnitude <= 0:
        return x, None
    lp, lm, ls = picks[sl], mags[sl], signs[sl]
    for j in range(num_ops):
        for k, op in enumerate(COLOUR_OPS):
            idx = torch.nonzero(lp[:, j] == k).flatten()
            if len(idx):
                x[idx] = op(x[idx], lm[idx, j], ls[idx, j])
    geo = torch.zeros(B, len(GEOMETRIC_OPS))  # for the whole global batch: the affine is drawn for all B too
    for j in range(num_ops):
        for g in range(len(GEOMETRIC_OPS)):
            on = picks[:, j] == len(COLOUR_OPS) + g
            geo[:, g] += torch.where(on, mags[:, j] * signs[:, j], torch.zeros(()))
    return x, geo


def _affine_params(B: int, a: AugmentConfig, gen: torch.Generator, geo: Optional[torch.Tensor] = None) \
        -> torch.Tensor:
    """(B, 2, 3) inverse-affine matrices for affine_grid (output → input coordinates, in [-1, 1]). `geo` (B, 5):
    RandAugment's signed rotate/shear-x/shear-y/translate-x/translate-y strengths, added to the random affine;
    strength 1 is 30°, a shear of 0.3 and a shift of 30% of the size (RandAugment's ranges)."""
    ang = torch.deg2rad(_uniform(gen, B, -a.rotate, a.rotate))
    sc = _uniform(gen, B, *a.scale)
    sh = torch.deg2rad(_uniform(gen, B, -a.shear, a.shear))
    tx = _uniform(gen, B, -a.translate, a.translate) * 2
    ty = _uniform(gen, B, -a.translate, a.translate) * 2
    flip = (torch.rand(B, generator=gen) < 0.5).float() * 2 - 1 if a.hflip else torch.ones(B)
    shy = torch.zeros(B)
    if geo is not None:
        ang = ang + torch.deg2rad(30 * geo[:, 0])
        sh = sh + torch.atan(0.3 * geo[:, 1])
        shy = torch.atan(0.3 * geo[:, 2])
        tx = tx + 0.6 * geo[:, 3]
        ty = ty + 0.6 * geo[:, 4]
    cos, sin = torch.cos(ang), torch.sin(ang)
    # A = R(ang) · ShearX(sh) · S(sc) · Flip, mapped output → input so it is the inverse: divide by the scale;
    # a vertical shear (RandAugment's shear_y) multiplies from the left: [[1, 0], [tan(shy), 1]] · A.
    m00 = cos * flip / sc
    m01 = (-sin + cos * torch.tan(sh)) / sc
    m10 = sin * flip / sc
    m11 = (cos + sin * torch.tan(sh)) / sc
    t = torch.tan(shy)
    m10, m11 = m10 + t * m00, m11 + t * m01
    return torch.stack([torch.stack([m00, m01, tx], 1), torch.stack([m10, m11, ty], 1)], 1)


def _trivial_augment(x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """TrivialAugmentWide per image, each under its own seed (uint8 in, uint8 out)."""
    from torchvision.transforms import v2

    t = v2.TrivialAugmentWide()
    out = torch.empty_like(x)
    with torch.random.fork_rng(devices=[]):
        for i in range(x.shape[0]):
            torch.manual_seed(int(seeds[i]))
            out[i] = t(x[i])
    return out


def _random_erase(x: torch.Tensor, B: int, sl: slice, p: float, gen: torch.Generator) -> torch.Tensor:
    """Zero (the normalised mean) a random rectangle of 2-25% area in a fraction `p` of the images."""
    H, W = x.shape[-2:]
    on = (torch.rand(B, generator=gen) < p)[sl]
    area = _uniform(gen, B, 0.02, 0.25)[sl]
    ratio = torch.exp(_uniform(gen, B, math.log(0.3), math.log(3.3)))[sl]
    cy, cx = torch.rand(B, generator=gen)[sl], torch.rand(B, generator=gen)[sl]
    h = (torch.sqrt(area * ratio) * H).clamp(1, H)
    w = (torch.sqrt(area / ratio) * W).clamp(1, W)
    ys = torch.arange(H).view(1, H, 1)
    xs = torch.arange(W).view(1, 1, W)
    y0 = (cy * (H - h)).view(-1, 1, 1)
    x0 = (cx * (W - w)).view(-1, 1, 1)
    box = (ys >= y0) & (ys < y0 + h.view(-1, 1, 1)) & (xs >= x0) & (xs < x0 + w.view(-1, 1, 1)) & on.view(-1, 1, 1)
    return x.masked_fill(box.unsqueeze(1), 0.0)


class MixUp:
    """MixUp (Beta(α, α) blend) or CutMix (a Beta-sized box), one of them per batch with probability `prob`,
    pairing each image with the batch reversed (as timm). Returns soft targets (b, K) with label smoothing."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 smoothing: float = 0.1, ramp: float = 0.0):
        self.k, self.ma, self.ca, self.prob, self.smoothing = num_classes, mixup_alpha, cutmix_alpha, prob, smoothing
        self.ramp = ramp  # > 0: the probability grows from 0 to `prob` over this fraction of the schedule

    def __call__(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, progress: float = 1.0):
        off = self.smoothing / self.k
        t = torch.full((len(y), self.k), off).scatter_(1, y.view(-1, 1), 1 - self.smoothing + off)
        u = torch.rand(3, generator=gen)
        prob = self.prob * (1.0 if self.ramp <= 0 else min(1.0, max(0.0, progress) / self.ramp))
        if u[0] >= prob or (self.ma <= 0 and self.ca <= 0):
            return x, t
        use_cut = self.ca > 0 and (self.ma <= 0 or u[1] < 0.5)
        alpha = self.ca if use_cut else self.ma
        lam = _beta(alpha, gen)
        if use_cut:
            H, W = x.shape[-2:]
            r = math.sqrt(1 - lam)
            ch, cw = int(H * r), int(W * r)
            cy, cx = torch.randint(0, H, (1,), generator=gen).item(), torch.randint(0, W, (1,), generator=gen).item()
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
            x = x.clone()
            x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
        else:
            x = x * lam + x.flip(0) * (1 - lam)
        return x, t * lam + t.flip(0) * (1 - lam)


def _beta(alpha: float, gen: torch.Generator) -> float:
    """One Beta(α, α) draw, seeded from `gen` (torch's Beta sampler takes no generator)."""
    import numpy as np

    return float(np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen))).beta(alpha, alpha))


# ---- per-sample transforms (folders, predict) -----------------------------------------------------------------
def folder_train_transform(size, mean, std, kind: str = "natural", level: str = "default"):
    """PIL → normalised tensor with RandomResizedCrop, flips (not digits), TrivialAugmentWide."""
    from torchvision.transforms import v2

    level_cfg = default_augment(kind, level)
    ops = []
    if level == "none":
        ops.append(v2.Resize(_pair(size), antialias=True))
    else:
        ops.append(v2.RandomResizedCrop(_pair(size), scale=(0.35 if level != "light" else 0.6, 1.0), antialias=True))
        if level_cfg.hflip:
            ops.append(v2.RandomHorizontalFlip())
        if level_cfg.trivial_augment:
            ops.append(v2.TrivialAugmentWide())
    ops += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if level_cfg.erase:
        ops.append(v2.RandomErasing(p=level_cfg.erase))
    return v2.Compose(ops)


def eval_transform(pre: Preprocessing, size=None):
    """PIL → normalised tensor (C, H, W) by `pre`: resize the short side to size/crop_pct, centre-crop `size`
    (timm's eval); `size` (an int or (H, W)) overrides `pre`'s input size."""
    from torchvision.transforms import InterpolationMode, v2

    h, w = _pair(size if size is not None else pre.size)
    interp = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
              "nearest": InterpolationMode.NEAREST}.get(pre.interpolation, InterpolationMode.BICUBIC)
    if pre.crop_pct >= 1.0:
        resize = v2.Resize((h, w), interpolation=interp, antialias=True)
    else:
        resize = v2.Resize(int(math.floor(min(h, w) / pre.crop_pct)), interpolation=interp, antialias=True)
    return v2.Compose([resize, v2.CenterCrop((h, w)), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(pre.mean), list(pre.std))])
