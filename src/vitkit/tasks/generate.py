"""Image generation with a class-conditional DiT: training (a user of `vitkit.train.Trainer`), sampling, and the
quality measurement with a vitkit classifier.

    summary = train_generator(GeneratorConfig(data="mnist5k", objective="flow"), TrainConfig(name="dit", ...))
    images = sample(load("runs/dit"), classes=[3] * 16, steps=50, cfg_scale=2.0, seed=0)   # (16, C, H, W) in [0, 1]
    scores = score_samples(images, labels, "runs/clf", real="mnist5k")   # conditional accuracy, classifier FID

"Classifier FID" is the Fréchet distance between Gaussians fitted to the classifier's pre-logit features of two
image sets (the Inception-FID formula on a small digit classifier's features; it is *not* the Inception FID).
It is reported beside the same distance between real training and real test images, the floor a perfect
generator would reach with the same number of images.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from ..data import DataOptions, build_datasets
from ..errors import CheckpointError, ConfigError
from ..io.plots import save_image_grid
from ..models import Preprocessing, denormalize, normalize
from ..models.diffusion import get_objective
from ..models.dit import OBJECTIVES, DiT, DiTConfig
from ..train import Trainer, TrainConfig, claim_run, mean_over_batches, resume_configs

log = logging.getLogger(__name__)

# mnist5k recipe: a small pixel-space DiT (patch 4 → 49 tokens) that trains in minutes on 2 CPU cores.
RECIPES: Dict[str, dict] = {
    "mnist5k": dict(model_args={"embed_dim": 128, "depth": 4, "num_heads": 4, "patch_size": 4},
                    batch_size=64, lr=1e-3, weight_decay=0.0, warmup=0.02, ema_decay=0.999, time_budget=600.0,
                    clip_grad=1.0, best_metric="val_loss", best_mode="min"),
}
DEFAULT_RECIPE = dict(model_args={"embed_dim": 192, "depth": 6, "num_heads": 6, "patch_size": 4}, batch_size=64,
                      lr=1e-3, weight_decay=0.0, warmup=0.02, ema_decay=0.9999, epochs=100, clip_grad=1.0,
                      best_metric="val_loss", best_mode="min")


@dataclass
class GeneratorConfig(DataOptions):
    """The task half of a `train-gen` run (the engine half is `TrainConfig`); the data fields are `DataOptions`'."""

    augment: str = "none"
    max_val: Optional[int] = 500  # held-out images for the validation loss (fixed noise and timesteps)
    objective: str = "flow"  # flow (rectified flow, Euler sampling) | ddpm (ε-prediction, DDIM sampling)
    model_args: Dict = field(default_factory=dict)  # DiTConfig fields: embed_dim, depth, num_heads, patch_size, ...
    class_dropout_prob: float = 0.1  # labels replaced by the null class, for classifier-free guidance
    img_size: Optional[int] = None  # default: the data's own size
    init: Optional[str] = None  # start from a train-gen checkpoint's (EMA) weights, with a fresh schedule
    sample_steps: int = 50  # the sample grid written at the end of the run
    sample_cfg: float = 2.0

    def __post_init__(self) -> None:
        from .. import validate as v

        super().__post_init__()
        v.choice(self.objective, "objective", OBJECTIVES)
        v.number(self.class_dropout_prob, "class_dropout_prob", lo=0, hi=1, hi_open=True)
        v.integer(self.img_size, "img_size", lo=1, optional=True)
        v.integer(self.sample_steps, "sample_steps", lo=1)
        v.number(self.sample_cfg, "sample_cfg")
        if not isinstance(self.model_args, dict):
            raise ConfigError(f"model_args must be a dict of DiTConfig options, got {self.model_args!r}",
                              field="model_args")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def recipe_for(data: str) -> dict:
    r = RECIPES.get(data, DEFAULT_RECIPE)
    return {**r, "model_args": dict(r["model_args"])}


def build_generator(task: GeneratorConfig, info) -> DiT:
    size = task.img_size or info.img_size[0]
    cfg = DiTConfig(img_size=size, in_chans=info.in_chans, num_classes=info.num_classes,
                    class_dropout_prob=task.class_dropout_prob, objective=task.objective)
    return DiT(cfg.replace(**task.model_args))


def generation_loss(objective) -> callable:
    """(model, (x, y)) → the objective's loss; the batch's images are in [-1, 1]."""

    def loss_fn(model, batch):
        x, y = batch
        return objective.loss(model, x, y), {}

    return loss_fn


@torch.no_grad()
def denoising_loss(model, dataset, objective, batch_size: int = 250, seed: int = 0) -> float:
    """The objective's loss on held-out images with noise and timesteps fixed by `seed`: comparable across epochs."""
    g = torch.Generator().manual_seed(seed)
    return mean_over_batches(model, dataset, lambda x, y: objective.loss(model, x, y, generator=g), batch_size)


def train_generator(task: GeneratorConfig, train_cfg: TrainConfig) -> dict:
    """Train a class-conditional DiT on `task.data` with the engine; writes the run folder, returns the summary."""
    with claim_run(train_cfg, is_main=os.environ.get("RANK", "0") == "0") as run:  # before the data is read
        if train_cfg.resume:
            task, train_cfg = resume_configs(train_cfg, "generate", "generator", GeneratorConfig, "a train-gen run")
        return _train_generator(task, train_cfg, run)


def _train_generator(task: GeneratorConfig, train_cfg: TrainConfig, run) -> dict:
    """train_generator once its run folder is claimed."""
    torch.manual_seed(train_cfg.seed)
    train, val, info = task.datasets(train_cfg.seed, img_size=task.img_size)
    # a diffusion model works on images scaled to [-1, 1] (mean = std = 0.5), not on the dataset's statistics
    for ds in (train, val):
        if not hasattr(ds.transform, "mean"):
            raise ConfigError(f"train-gen works on in-memory datasets (mnist5k, digits, mnist, fashion_mnist, cifar10, "
                              f"cifar100), not {task.data!r}")
        ds.transform.mean = torch.full_like(ds.transform.mean, 0.5)
        ds.transform.std = torch.full_like(ds.transform.std, 0.5)
    info.mean, info.std = [0.5] * info.in_chans, [0.5] * info.in_chans
    torch.manual_seed(train_cfg.seed)
    model = build_generator(task, info)
    if task.init:
        model = _init_from(task.init, model)
    model.pretrained_cfg = dataclasses.replace(Preprocessing.default(model.config), mean=tuple(info.mean),
                                               std=tuple(info.std), class_names=tuple(info.class_names),
                                               extra={"dataset": info.spec, "objective": task.objective}).to_dict()
    objective = get_objective(task.objective)
    resolved = {"task": "generate", "generator": task.to_dict(), "model": model.config.to_dict(),
                "data": info.to_dict()}

    def eval_fn(m):
        return {"val_loss": denoising_loss(m, val, objective)}

    def end_fn(trainer, summary):
        return _final_report(trainer, task, info)

    log.info("data %s: %d train images, %d classes; DiT %s objective, %.2fM params", info.spec, len(train),
             info.num_classes, task.objective, sum(p.numel() for p in model.parameters()) / 1e6)
    trainer = Trainer(model, train, train_cfg, generation_loss(objective), eval_fn, resolved=resolved, end_fn=end_fn,
                      run=run)
    return trainer.fit()


def _init_from(path, fresh: DiT) -> DiT:
    """A DiT checkpoint's weights as the starting point of a new run; it must be the model this run would build
    (same architecture, classes and objective), else a clear error."""
    from ..io import load

    src = load(path)
    if not isinstance(src, DiT):
        raise CheckpointError(f"--init {str(path)!r} holds a {type(src).__name__}, not a DiT from `vitkit train-gen`")
    a, b = src.config.to_dict(), fresh.config.to_dict()
    diff = sorted(k for k in a if k not in ("name", "class_dropout_prob") and a[k] != b.get(k))
    if diff:
        raise ConfigError(f"--init {str(path)!r} differs from this run's DiT in {', '.join(f'{k} ({a[k]} vs {b[k]})' for k in diff)}; "
                          "pass the same --objective and --model-arg options it was trained with")
    fresh.load_state_dict(src.state_dict())
    return fresh


def _final_report(trainer, task: GeneratorConfig, info) -> dict:
    """After training: a grid of samples from the saved (EMA) weights, one row per class."""
    from ..io import load

    run = trainer.run.path
    model = load(run / "last.safetensors").to(trainer.device)
    k = min(info.num_classes, 10)
    classes = [c for c in range(k) for _ in range(8)]
    imgs = sample(model, classes, steps=task.sample_steps, cfg_scale=task.sample_cfg, seed=0)
    save_image_grid(imgs, run / "samples.png", nrow=8)
    md = ["## Samples", "", f"{task.sample_steps} {'Euler' if task.objective == 'flow' else 'DDIM'} steps, "
          f"guidance {task.sample_cfg}, seed 0, one row per class: ![samples](samples.png)", ""]
    return {"samples": str(run / "samples.png"), "markdown": "\n".join(md)}


# ---- sampling -------------------------------------------------------------------------------------------------
def check_classes(model: DiT, classes: Sequence[int]) -> None:
    """Refuse classes the checkpoint does not know, naming the ones it does."""
    names = Preprocessing.of(model).class_names
    bad = [c for c in classes if not 0 <= int(c) < model.num_classes]
    if bad:
        known = f"0..{model.num_classes - 1}" + (f" ({', '.join(map(str, names))})" if names else "")
        raise ConfigError(f"class {bad[0]} is not one this checkpoint was trained on: it knows classes {known}")


@torch.no_grad()
def sample(model: DiT, classes: Sequence[int], *, steps: int = 50, cfg_scale: float = 2.0, seed: int = 0,
           batch_size: int = 250, device=None) -> torch.Tensor:
    """Images (B, C, H, W) in [0, 1] for the given class labels; the noise comes from `seed`, so the same call
    gives the same images. The objective and the normalisation come from the checkpoint."""
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    check_classes(model, classes)
    model.eval()
    device = device or next(model.parameters()).device
    objective = get_objective(model.config.objective)
    c, s = model.config.in_chans, model.config.img_size
    y_all = torch.as_tensor(list(classes), dtype=torch.long)
    noise_all = torch.randn(len(y_all), c, s, s, generator=torch.Generator().manual_seed(seed))
    pre = Preprocessing.of(model)
    out = []
    for i in range(0, len(y_all), batch_size):
        x = objective.sample(model, noise_all[i:i + batch_size].to(device), y_all[i:i + batch_size].to(device),
                             steps=steps, cfg_scale=cfg_scale)
        out.append(denormalize(x.cpu(), pre).clamp(0, 1))
    return torch.cat(out) if out else torch.zeros(0, c, s, s)


save_grid = save_image_grid  # its old name here (`vitkit generate`, scripts)


# ---- quality with a classifier --------------------------------------------------------------------------------
def _classifier_input(clf, images01: torch.Tensor) -> torch.Tensor:
    return normalize(images01, Preprocessing.of(clf))


@torch.no_grad()
def classifier_outputs(clf, images01: torch.Tensor, batch_size: int = 500):
    """Images (B, C, H, W) in [0, 1] → (pre-logit features (B, D), predicted classes (B,)) of a vitkit classifier."""
    clf.eval()
    device = next(clf.parameters()).device
    feats, preds = [], []
    for i in range(0, len(images01), batch_size):
        x = _classifier_input(clf, images01[i:i + batch_size]).to(device)
        f = clf.forward_head(clf.forward_features(x), pre_logits=True)
        feats.append(f.float().cpu())
        preds.append(clf.head(f).argmax(-1).cpu())
    return torch.cat(feats).double().numpy(), torch.cat(preds)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D): |μa − μb|² + tr(Σa + Σb − 2(ΣaΣb)^½)."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
    if not np.isfinite(covmean).all():  # singular product: nudge the diagonals (as pytorch-fid does)
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + off).dot(s2 + off))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def real_images(data: str, split: str, n: Optional[int] = None, seed: int = 0, in_chans: Optional[int] = None):
    """Real images in [0, 1] (N, C, H, W) and labels of a dataset split ('train' or 'val'), optionally a stratified
    subset of `n`."""
    kw = {"max_train": n} if split == "train" else {"max_val": n}
    train, val, info = build_datasets(data, augment="none", in_chans=in_chans, seed=seed, **kw)
    ds = train if split == "train" else val
    return ds.images.float() / 255.0, ds.labels.clone()


def score_samples(images01: torch.Tensor, labels: torch.Tensor, classifier, real: str = "mnist5k",
                  seed: int = 0) -> dict:
    """Conditional accuracy of generated images and their classifier FID against the real test split, beside the
    floor: the same distance between as many real training images and the real test split."""
    from ..io import load

    clf = load(classifier) if isinstance(classifier, (str, Path)) else classifier
    if getattr(clf, "num_classes", 0) <= 0:
        raise CheckpointError(f"{classifier!r} is not a classifier (it has no classification head)")
    feats, preds = classifier_outputs(clf, images01)
    test, _ = real_images(real, "val", in_chans=clf.config.in_chans)
    train, _ = real_images(real, "train", n=len(images01), seed=seed, in_chans=clf.config.in_chans)
    f_test, _ = classifier_outputs(clf, test)
    f_train, _ = classifier_outputs(clf, train)
    per_class = {}
    for c in labels.unique().tolist():
        m = labels == c
        per_class[str(c)] = round(100.0 * float((preds[m] == c).float().mean()), 2)
    return {"num_samples": len(images01), "conditional_accuracy": round(100.0 * float((preds == labels).float()
                                                                                       .mean()), 2),
            "per_class_accuracy": per_class,
            "classifier_fid": round(frechet_distance(feats, f_test), 3),
            "classifier_fid_floor_train_vs_test": round(frechet_distance(f_train, f_test), 3),
            "num_real_test": len(test), "num_real_train": len(train)}


def generate_to_folder(checkpoint, out="samples", *, classes: Optional[Sequence[int]] = None, n: int = 16,
                       steps: int = 50, cfg: float = 2.0, seed: int = 0, classifier=None,
                       real: Optional[str] = None) -> dict:
    """Sample `n` images per class (default: every class) from a DiT checkpoint into `out`: a PNG grid, the images
    and labels as .npy and, with a `classifier`, their scores (_scores.json). Returns what was written."""
    import json

    from .. import validate as v
    from ..io import load

    v.integer(n, "n", lo=1)
    v.integer(steps, "steps", lo=1)
    v.number(cfg, "cfg")
    model = load(checkpoint)
    if not isinstance(model, DiT):
        raise CheckpointError(f"{checkpoint!r} holds a {type(model).__name__}, not a DiT; generate needs a "
                              "checkpoint from `vitkit train-gen`")
    classes = list(classes) if classes is not None else list(range(model.num_classes))
    check_classes(model, classes)
    labels = [c for c in classes for _ in range(n)]
    imgs = sample(model, labels, steps=steps, cfg_scale=cfg, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"class{'-'.join(map(str, classes))}" if len(classes) <= 4 else "all"
    stem += f"_n{n}_steps{steps}_cfg{cfg:g}_seed{seed}"
    per_row = min(n, 16)  # the grid: one row of up to 16 images per class; the .npy holds them all
    shown = [k * n + j for k in range(len(classes)) for j in range(per_row)]
    png = save_grid(imgs[shown], out / f"{stem}.png", nrow=per_row)
    npy = out / f"{stem}.npy"
    np.save(npy, imgs.numpy().astype(np.float32))
    np.save(out / f"{stem}_labels.npy", np.asarray(labels, dtype=np.int64))
    result = {"checkpoint": str(checkpoint), "samples": len(labels), "png": str(png), "npy": str(npy)}
    if classifier:
        pcfg = model.pretrained_cfg or {}
        result.update(score_samples(imgs, torch.as_tensor(labels), classifier,
                                    real=real or pcfg.get("dataset") or "mnist5k", seed=seed))
        result.update({"steps": steps, "cfg": cfg, "seed": seed, "classifier": classifier})
        (out / f"{stem}_scores.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


__all__ = ["GeneratorConfig", "train_generator", "build_generator", "sample", "save_grid", "check_classes",
           "classifier_outputs", "frechet_distance", "score_samples", "real_images", "recipe_for", "denoising_loss",
           "generate_to_folder"]
