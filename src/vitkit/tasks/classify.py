"""Image classification: the training recipe (a user of `vitkit.train.Trainer`), evaluation and prediction.

    summary = train_classifier(ClassifierConfig(data="mnist5k"), TrainConfig(name="demo", time_budget=240))
    report = evaluate_checkpoint("runs/demo", "mnist5k")        # top-1/top-5, per class, confusion matrix
    preds = predict("runs/demo", ["a.png", "folder/"], topk=3)  # labels by name with probabilities
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..data import IMG_EXTENSIONS, DataOptions, MixUp, build_datasets, eval_transform, make_loader, read_image
from ..errors import CheckpointError, ConfigError, DataError
from ..models import create_model, get_config
from ..train import Trainer, TrainConfig, resolve_device, resume_configs

log = logging.getLogger(__name__)

# The recipe per dataset: model, schedule and regularisation that fit the data and a CPU. Flags override them.
# mnist5k is the demo: sized and scheduled so that `make demo` trains in under 5 minutes on 2 CPU cores.
RECIPES: Dict[str, dict] = {
    # mnist5k's 1,000 held-out digits are its test set, so they must not pick the checkpoint: best = last.
    "mnist5k": dict(model="vit_micro_patch7_28", time_budget=270.0, batch_size=64, lr=3e-3, weight_decay=0.05,
                    warmup=0.05, label_smoothing=0.1, augment="default", ema_decay=0.995, best_metric=""),
    "digits": dict(model="vit_mini_patch7_28", epochs=60, batch_size=128, lr=2e-3, label_smoothing=0.1,
                   augment="light", model_args={"img_size": 8, "patch_size": 2, "global_pool": "avg"}),
    "mnist": dict(model="vit_mini_patch7_28", epochs=10, batch_size=256, lr=2e-3, label_smoothing=0.1,
                  augment="default", model_args={"global_pool": "avg"}),
    "fashion_mnist": dict(model="vit_mini_patch7_28", epochs=20, batch_size=256, lr=2e-3, label_smoothing=0.1,
                          augment="default", model_args={"global_pool": "avg"}),
    "cifar10": dict(model="vit_mini_patch4_32", epochs=100, batch_size=256, lr=1e-3, label_smoothing=0.1,
                    augment="default", mixup=0.8, cutmix=1.0, model_args={"global_pool": "avg",
                                                                             "drop_path_rate": 0.1}),
    "cifar100": dict(model="vit_mini_patch4_32", epochs=100, batch_size=256, lr=1e-3, label_smoothing=0.1,
                     augment="default", mixup=0.8, cutmix=1.0, model_args={"global_pool": "avg",
                                                                              "drop_path_rate": 0.1}),
    "folder": dict(model="vit_tiny_patch16_224", epochs=30, batch_size=64, lr=5e-4, label_smoothing=0.1,
                   augment="default"),
}


@dataclass
class ClassifierConfig(DataOptions):
    """The task half of a classifier run (the engine half is `TrainConfig`); the data fields are `DataOptions`'."""

    model: Optional[str] = None  # registered name; None → the dataset's recipe
    model_args: Dict = field(default_factory=dict)  # ViTConfig overrides, e.g. {"drop_path_rate": 0.1}
    init: Optional[str] = None  # pretrained weights (vitkit checkpoint, or what vitkit.io.load_pretrained reads)
    init_format: Optional[str] = None
    label_smoothing: float = 0.1
    mixup: float = 0.0  # MixUp alpha (0 = off)
    cutmix: float = 0.0  # CutMix alpha (0 = off)
    eval_batch_size: int = 500

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def recipe_for(data: str) -> dict:
    return dict(RECIPES.get("folder" if data.startswith("folder:") else data, RECIPES["folder"]))


def load_init(task: ClassifierConfig):
    """The pretrained model of `task.init`, any format `load_pretrained` reads, resampled to a requested
    `img_size`/`patch_size` (the head is replaced later, once the data has told the class count)."""
    from ..io import load_pretrained

    args = task.model_args
    return load_pretrained(task.init, fmt=task.init_format, model=task.model, num_heads=args.get("num_heads"),
                           img_size=args.get("img_size"), patch_size=args.get("patch_size"))


def build_classifier(task: ClassifierConfig, num_classes: int, pretrained=None):
    """The model a run trains: pretrained weights (`init`, loaded by `load_init`) with a new head for the data,
    or a fresh registered config."""
    args = dict(task.model_args)
    if task.init:
        from ..io import adapt_model

        model = pretrained if pretrained is not None else load_init(task)
        for k in ("img_size", "patch_size", "num_heads"):
            args.pop(k, None)
        model = adapt_model(model, num_classes=num_classes, global_pool=args.pop("global_pool", None))
        if args:
            log.warning("ignoring model options %s with --init (the pretrained architecture is kept)", sorted(args))
        return model.train()
    cfg = get_config(task.model or "vit_mini_patch7_28")
    return create_model(config=cfg, num_classes=num_classes, **args)


def classification_loss(label_smoothing: float = 0.0) -> Callable:
    """(model, (x, y)) → (cross-entropy, {'acc': ...}); y is class indices (B,) or soft targets (B, K)."""

    def loss_fn(model, batch):
        x, y = batch
        logits = model(x)
        if y.ndim == 2:  # MixUp/CutMix soft targets (smoothing already folded in)
            loss = torch.sum(-y * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            acc = (logits.argmax(-1) == y.argmax(-1)).float().mean()
        else:
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            acc = (logits.argmax(-1) == y).float().mean()
        return loss, {"acc": acc.item()}

    return loss_fn


@torch.no_grad()
def evaluate(model, dataset, *, batch_size: int = 500, device=None, full: bool = False) -> dict:
    """val_loss, top1, top5 (in %) of `model` on `dataset`; with `full`, also per-class accuracy and the confusion
    matrix (rows = true class, columns = predicted)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    k = model.num_classes
    conf = torch.zeros(k, k, dtype=torch.long)
    loss_sum, n, top5 = 0.0, 0, 0
    for x, y in make_loader(dataset, batch_size, train=False):
        x, y = x.to(device), y.to(device)
        logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        pred = logits.argmax(-1)
        top5 += (logits.topk(min(5, k), -1).indices == y[:, None]).any(-1).sum().item()
        conf += torch.bincount((y * k + pred).cpu(), minlength=k * k).view(k, k)
        n += len(y)
    model.train(was_training)
    out = {"val_loss": loss_sum / max(1, n), "top1": 100.0 * conf.diag().sum().item() / max(1, n),
           "top5": 100.0 * top5 / max(1, n)}
    if full:
        per = conf.diag().float() / conf.sum(1).clamp(min=1).float() * 100
        out.update({"num_images": n, "per_class": per.tolist(), "confusion": conf.tolist()})
    return out


def _pretrained_cfg(info, model) -> dict:
    c = model.config
    size = c.img_size if isinstance(c.img_size, (tuple, list)) else (c.img_size, c.img_size)
    return {"class_names": list(info.class_names), "mean": list(info.mean), "std": list(info.std),
            "input_size": [c.in_chans, int(size[0]), int(size[1])], "interpolation": "bilinear", "crop_pct": 1.0,
            "dataset": info.spec}


def train_classifier(task: ClassifierConfig, train_cfg: TrainConfig, *, on_epoch_end: Optional[Callable] = None) \
        -> dict:
    """Train a ViT classifier on `task.data` with the engine; writes the run folder and returns the summary."""
    torch.manual_seed(train_cfg.seed)  # the same initial weights in every process and every repeat
    if train_cfg.resume:
        task, train_cfg = resume_configs(train_cfg, "classify", "classifier", ClassifierConfig, "a classifier run")
    # the data decides the class count; the model decides image size, channels (and, pretrained, normalisation)
    pretrained = load_init(task) if task.init else None
    norm = {}
    if pretrained is not None:
        c, pcfg = pretrained.config, getattr(pretrained, "pretrained_cfg", None) or {}
        probe = (c.in_chans, c.img_size if isinstance(c.img_size, int) else c.img_size[0])
        if pcfg.get("mean") and pcfg.get("std"):
            norm = {"mean": tuple(pcfg["mean"]), "std": tuple(pcfg["std"])}
    else:
        probe = _model_input(task)
    train, val, info = task.datasets(train_cfg.seed, img_size=probe[1], in_chans=probe[0], **norm)
    torch.manual_seed(train_cfg.seed)
    model = build_classifier(task, info.num_classes, pretrained)
    if model.config.in_chans != info.in_chans:
        raise ConfigError(f"the model takes {model.config.in_chans} channels but the data was built with "
                          f"{info.in_chans}")
    model.pretrained_cfg = _pretrained_cfg(info, model)
    mixup = MixUp(info.num_classes, task.mixup, task.cutmix, smoothing=task.label_smoothing) \
        if (task.mixup or task.cutmix) else None
    resolved = {"task": "classify", "classifier": task.to_dict(), "model": model.config.to_dict(),
                "data": info.to_dict()}

    def eval_fn(m):
        return evaluate(m, val, batch_size=task.eval_batch_size)

    def end_fn(trainer, summary):
        return _final_report(trainer, val, info, task)

    say = log.info if os.environ.get("RANK", "0") == "0" else log.debug  # once, not once per process
    say("data %s: %d train / %d val images, %d classes%s; model %s (%.2fM params)", info.spec, len(train),
             len(val), info.num_classes, f", {len(info.skipped)} unreadable skipped" if info.skipped else "",
             model.config.name or "custom", sum(p.numel() for p in model.parameters()) / 1e6)
    trainer = Trainer(model, train, train_cfg, classification_loss(task.label_smoothing), eval_fn,
                      resolved=resolved, end_fn=end_fn, on_epoch_end=on_epoch_end,
                      loader_kwargs={"mixup": mixup} if mixup else None)
    return trainer.fit()


def _model_input(task: ClassifierConfig):
    """(channels, img_size) a fresh model will take, before it is built (so the data can be shaped for it)."""
    cfg = get_config(task.model or "vit_mini_patch7_28")
    return task.model_args.get("in_chans", cfg.in_chans), task.model_args.get("img_size", cfg.img_size)


def _final_report(trainer, val, info, task: ClassifierConfig) -> dict:
    """After training: evaluate the best checkpoint in full; learning curves and confusion matrix as PNG."""
    from ..io import load

    run = trainer.run.path
    best = load(run / "best.safetensors").to(trainer.device)
    ev = evaluate(best, val, batch_size=task.eval_batch_size, full=True)
    plot_learning_curves(trainer.history, run / "curves.png")
    plot_confusion(ev["confusion"], info.class_names, run / "confusion.png", title=f"{run.name}: top-1 "
                   f"{ev['top1']:.2f}%")
    md = ["## Best checkpoint on the validation set", "",
          f"- top-1 **{ev['top1']:.2f}%**, top-5 {ev['top5']:.2f}%, loss {ev['val_loss']:.4f} "
          f"on {ev['num_images']} images ({info.spec})",
          "- per class: " + ", ".join(f"{n} {a:.1f}%" for n, a in zip(info.class_names, ev["per_class"])),
          f"- skipped unreadable images: {len(info.skipped)}", "",
          "![learning curves](curves.png) ![confusion matrix](confusion.png)", ""]
    return {"eval": {k: ev[k] for k in ("top1", "top5", "val_loss", "num_images", "per_class")},
            "skipped_images": len(info.skipped), "markdown": "\n".join(md)}


# ---- plots ----------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(history: List[dict], path) -> Path:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    ep = [r["epoch"] for r in history]
    a.plot(ep, [r.get("train_loss") for r in history], label="train loss")
    if any("val_loss" in r for r in history):
        a.plot(ep, [r.get("val_loss") for r in history], label="val loss")
    a.set_xlabel("epoch")
    a.legend()
    if any("top1" in r for r in history):
        b.plot(ep, [r.get("top1") for r in history], label="val top-1 %")
        b.set_xlabel("epoch")
        b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_confusion(conf, class_names: Sequence[str], path, title: str = "") -> Path:
    plt = _plt()
    import numpy as np

    m = np.asarray(conf)
    k = len(class_names)
    size = min(12, 2 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues")
    if k <= 30:
        ax.set_xticks(range(k), class_names, rotation=90)
        ax.set_yticks(range(k), class_names)
        for i in range(k):
            for j in range(k):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


# ---- evaluate and predict a checkpoint ------------------------------------------------------------------------
def load_classifier(path, device="cpu", fast: bool = False, tome: int = 0):
    """A vitkit classifier checkpoint (or run folder) → model in eval mode, with its class names.
    `fast` runs the exact fast path (`vitkit.optimize`); `tome` > 0 merges that many tokens per block."""
    from ..io import load

    model = load(path).to(device)
    if model.num_classes <= 0:
        raise CheckpointError(f"{str(path)!r} holds a model without a classification head; it cannot classify")
    names = (model.pretrained_cfg or {}).get("class_names") or [str(i) for i in range(model.num_classes)]
    if len(names) != model.num_classes:
        raise CheckpointError(f"{str(path)!r} names {len(names)} classes but its head has {model.num_classes}")
    if fast or tome:
        from ..models.fast import optimize

        model = optimize(model, tome_r=tome, backend="auto" if fast else "eager")
    return model, list(names)


def evaluate_checkpoint(path, data: str, *, out_dir=None, batch_size: int = 500, device="auto",
                        data_dir="data", download=False, val_split: Optional[float] = None,
                        seed: Optional[int] = None, strict: bool = False, max_val: Optional[int] = None,
                        fast: bool = False, tome: int = 0) -> dict:
    """Top-1/top-5, per-class accuracy and confusion matrix of a checkpoint on a dataset's validation split;
    writes eval.json and eval_confusion.png into `out_dir` (default: the run folder, or next to the file).
    `val_split`/`seed` (how a PATH/<class>/* folder is split) default to the run's own, so the held-out
    images are the ones the run held out."""
    import json

    p = Path(path)
    run_cfg = (p if p.is_dir() else p.parent) / "config.json"
    saved = json.loads(run_cfg.read_text()) if run_cfg.is_file() else {}
    if val_split is None:
        val_split = saved.get("classifier", {}).get("val_split", 0.1)
    if seed is None:
        seed = saved.get("train", {}).get("seed", 0)
    dev = resolve_device(device)
    model, names = load_classifier(path, dev, fast=fast, tome=tome)
    pcfg = model.pretrained_cfg or {}
    c = model.config
    _, val, info = build_datasets(data, img_size=c.img_size, in_chans=c.in_chans, augment="none",
                                  mean=pcfg.get("mean"), std=pcfg.get("std"), crop_pct=pcfg.get("crop_pct", 1.0),
                                  data_dir=data_dir, download=download, val_split=val_split, seed=seed,
                                  strict=strict, max_val=max_val)
    if info.num_classes != model.num_classes:
        raise CheckpointError(f"the checkpoint classifies {model.num_classes} classes but {data!r} has "
                              f"{info.num_classes}; evaluate it on the data it was trained for")
    if [str(n) for n in names] != [str(n) for n in info.class_names]:
        log.warning("class names differ between the checkpoint and %s; scoring by class index", data)
    ev = evaluate(model, val, batch_size=batch_size, device=dev, full=True)
    out = Path(out_dir) if out_dir else (p if p.is_dir() else p.parent)
    out.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": str(path), "data": info.spec, "num_images": ev["num_images"],
              "top1": round(ev["top1"], 3), "top5": round(ev["top5"], 3), "val_loss": round(ev["val_loss"], 5),
              "per_class": {str(n): round(a, 2) for n, a in zip(names, ev["per_class"])},
              "confusion": ev["confusion"], "class_names": names, "skipped_images": len(info.skipped),
              "fast": bool(fast), "tome_r": int(tome)}
    from ..io.checkpoint import atomic_write

    text = json.dumps(result, indent=2) + "\n"
    atomic_write(out / "eval.json", lambda tmp: Path(tmp).write_text(text))
    plot_confusion(ev["confusion"], names, out / "eval_confusion.png", title=f"{info.spec}: top-1 {ev['top1']:.2f}%")
    result["outputs"] = [str(out / "eval.json"), str(out / "eval_confusion.png")]
    return result


def collect_images(paths: Sequence) -> List[Path]:
    """Image files from files and folders (folders searched recursively, sorted); missing paths are an error."""
    files: List[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"image path {str(p)!r} does not exist; check the path")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
            if not found:
                raise DataError(f"folder {str(p)!r} holds no images ({', '.join(IMG_EXTENSIONS)})")
            files += found
        else:
            files.append(p)
    if not files:
        raise DataError("no images given; pass image files or folders")
    return files


@torch.no_grad()
def predict(checkpoint, paths: Sequence, *, topk: int = 5, batch_size: int = 64, device="auto",
            strict: bool = False, fast: bool = False, tome: int = 0) -> List[dict]:
    """Top-k labels (by name) with probabilities for each image; images are batched. Unreadable images are
    reported with an 'error' entry (or raise with `strict`)."""
    dev = resolve_device(device)
    model, names = load_classifier(checkpoint, dev, fast=fast, tome=tome)
    pcfg = model.pretrained_cfg or {}
    c = model.config
    size = c.img_size
    tf = eval_transform(size, pcfg.get("mean", [0.5] * c.in_chans), pcfg.get("std", [0.5] * c.in_chans),
                        crop_pct=pcfg.get("crop_pct", 1.0), interpolation=pcfg.get("interpolation", "bicubic"))
    files = collect_images(paths)
    k = max(1, min(topk, len(names)))
    results: List[Optional[dict]] = [None] * len(files)  # in the order the files were given
    for i in range(0, len(files), batch_size):
        xs, ok = [], []
        for j in range(i, min(i + batch_size, len(files))):
            try:
                xs.append(tf(read_image(files[j], c.in_chans)))
                ok.append(j)
            except DataError as e:
                if strict:
                    raise
                log.warning("%s", e)
                results[j] = {"path": str(files[j]), "error": str(e)}
        if not xs:
            continue
        probs = model(torch.stack(xs).to(dev)).float().softmax(-1)
        p, idx = probs.topk(k, -1)
        for j, pr, ix in zip(ok, p.tolist(), idx.tolist()):
            results[j] = {"path": str(files[j]), "label": names[ix[0]], "prob": round(pr[0], 5),
                          "topk": [{"label": names[t], "prob": round(q, 5)} for t, q in zip(ix, pr)]}
    return results
