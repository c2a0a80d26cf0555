"""What a data set looks like, measured rather than assumed: the facts a training recipe is derived from.

    prof = profile_images(images_uint8, labels, class_names)   # (N, C, H, W) uint8, a sample is enough
    prof.grey, prof.mirror_symmetric, prof.mean, prof.std, prof.imbalance

Nothing here looks at a data set's name or its class names: two folders with the same pixels get the same profile.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

# A class-mean image is "mirror-symmetric" when its left-right asymmetry (noise taken out) is below this share of
# its contrast. Photos of objects seen from either side give near-symmetric class means (measured on samples of
# 500 to 50,000 CIFAR-10 images: 0.00-0.02); handwriting and other oriented glyphs do not (MNIST, sklearn digits:
# 0.6-0.7). Horizontal flips keep the label for the former only.
SYMMETRY_THRESHOLD = 0.3


@dataclass
class DataProfile:
    """Counts, sizes, colour and symmetry of a training set (measured on the images themselves)."""

    num_train: int
    num_val: int
    num_classes: int
    class_counts: List[int]
    native_size: Tuple[int, int]  # median (height, width) of the images as stored
    size_range: Tuple[int, int]  # smallest and largest side seen
    channels: int  # channels as stored (1 or 3)
    grey: bool  # colour images whose channels are equal everywhere count as grey
    mean: List[float]  # per channel, in [0, 1], of the channels the model will see
    std: List[float]
    asymmetry: float  # left-right asymmetry of the class-mean images (0 = mirror-symmetric)
    sample_size: int = 0  # how many images the pixel statistics were measured on
    notes: List[str] = field(default_factory=list)

    @property
    def in_chans(self) -> int:
        """The channels a model needs for this data: 1 for grey images, else 3."""
        return 1 if self.grey else self.channels

    @property
    def mirror_symmetric(self) -> bool:
        """Horizontal flips keep the label (the class means look the same mirrored)."""
        return self.asymmetry < SYMMETRY_THRESHOLD

    @property
    def imbalance(self) -> float:
        """Largest class count over the smallest (1.0 = balanced)."""
        return max(self.class_counts) / max(1, min(self.class_counts))

    @classmethod
    def from_dict(cls, d: dict) -> "DataProfile":
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        fields["native_size"], fields["size_range"] = tuple(d["native_size"]), tuple(d["size_range"])
        return cls(**fields)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["in_chans"], d["mirror_symmetric"], d["imbalance"] = self.in_chans, self.mirror_symmetric, self.imbalance
        return d


def mirror_asymmetry(images: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int = 0) -> float:
    """How far the class-mean images are from their mirror images, as a share of their contrast, with the part
    that sampling noise alone would give taken out: 0 for mirror-symmetric data, ~0.6 for handwritten digits.
    Noise is estimated from the difference of the means of two random halves of each class."""
    x = images.float().mean(1) / 255  # (N, H, W)
    g = torch.Generator().manual_seed(seed)
    scores = []
    for c in range(num_classes):
        sel = x[labels == c]
        if len(sel) < 4:
            continue
        sel = sel[torch.randperm(len(sel), generator=g)]
        m, h = sel.mean(0), len(sel) // 2
        contrast = (m - m.mean()).norm()
        if contrast <= 1e-6:
            continue
        asym2 = (m - m.flip(-1)).pow(2).sum()
        noise2 = (sel[:h].mean(0) - sel[h:2 * h].mean(0)).pow(2).sum() / 2  # what a symmetric mean would show
        scores.append((torch.clamp(asym2 - noise2, min=0).sqrt() / contrast).item())
    return float(np.mean(scores)) if scores else 0.0


def profile_images(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, num_train: int,
                   num_val: int, class_counts: Optional[Sequence[int]] = None,
                   sizes: Optional[np.ndarray] = None, channels: Optional[int] = None) -> DataProfile:
    """Profile a data set from (a sample of) its images as uint8 (N, C, H, W) with labels. `sizes` are the stored
    (width, height) of every training image when they differ (folders); else the sample's own size is used."""
    images = torch.as_tensor(images)
    labels = torch.as_tensor(labels).long()
    c = int(channels or images.shape[1])
    if sizes is not None and len(sizes):
        hw = np.asarray(sizes)[:, ::-1]
        native = (int(np.median(hw[:, 0])), int(np.median(hw[:, 1])))
        srange = (int(hw.min()), int(hw.max()))
    else:
        native = (int(images.shape[2]), int(images.shape[3]))
        srange = (min(native), max(native))
    grey = images.shape[1] == 1 or bool((images[:, :1] == images[:, 1:]).all())
    x = images[:, :1].float() / 255 if grey else images.float() / 255
    mean = x.mean(dim=(0, 2, 3)).tolist()
    std = x.std(dim=(0, 2, 3)).clamp(min=1e-3).tolist()
    counts = list(class_counts) if class_counts is not None else \
        torch.bincount(labels, minlength=num_classes).tolist()
    prof = DataProfile(num_train, num_val, num_classes, [int(n) for n in counts], native, srange, c, grey, mean, std,
                       mirror_asymmetry(images, labels, num_classes), len(images))
    if grey and c == 3:
        prof.notes.append("colour files whose channels are all equal: treated as grey (1 channel)")
    if prof.imbalance > 3:
        prof.notes.append(f"classes are imbalanced ({prof.imbalance:.1f}x between the largest and smallest)")
    return prof


def stratified_sample(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Up to `n` indices spread evenly over the classes (seeded), for profiling a large set from a sample."""
    labels = torch.as_tensor(labels)
    if len(labels) <= n:
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    per = max(1, n // len(classes))
    out = []
    for c in classes.tolist():
        idx = torch.nonzero(labels == c).flatten()
        out.append(idx[torch.randperm(len(idx), generator=g)[:per]])
    return torch.cat(out).sort().values
