"""Image classification: the training recipe (a user of `vitkit.train.Trainer`), evaluation and prediction.

    summary = train_classifier(ClassifierConfig(data="mnist5k"), TrainConfig(name="demo", time_budget=240))
    report = evaluate_checkpoint("runs/demo", "mnist5k")        # top-1/top-5, per class, confusion matrix
    preds = predict("runs/demo", ["a.png", "folder/"], topk=3)  # labels by name with probabilities
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..data import (BatchTransform, DataOptions, InMemoryDataset, MixUp, ShardDataset, build_datasets,
                    collect_images, eval_transform, read_image)
from ..errors import CheckpointError, ConfigError, DataError
from ..io.plots import plot_confusion, plot_learning_curves
from ..models import Preprocessing, ViTConfig, create_model, get_config
from ..models.fast import precision_record
from ..models.precision import bf16_native
from ..runtime import resolve_device
from ..train import DistInfo, RunDir, Trainer, TrainConfig, claim_run, eval_batches, resume_configs, setup_distributed
from ..train.distributed import all_gather_obj
from .plan import DEFAULT_BUDGET, Plan, plan_recipe
from .recipe import MODEL_FIELDS, Recipe, resolve, tta_view_count, zoom_factors

log = logging.getLogger(__name__)



@dataclass
class ClassifierConfig(DataOptions):
    """The task half of a classifier run (the engine half is `TrainConfig`; the choices that shape the result are
    a `Recipe`); the data fields are `DataOptions`'."""

    model: Optional[str] = None  # registered name; None → the planner's (or the pretrained) architecture
    model_args: Dict = field(default_factory=dict)  # ViTConfig overrides, e.g. {"drop_path_rate": 0.1}
    init: Optional[str] = None  # pretrained weights (vitkit checkpoint, or what vitkit.io.load_pretrained reads)
    init_format: Optional[str] = None
    label_smoothing: float = 0.1
    mixup: float = 0.0  # MixUp alpha (0 = off)
    cutmix: float = 0.0  # CutMix alpha (0 = off)
    eval_batch_size: int = 500
    hflip: Optional[bool] = None  # horizontal flips in augmentation (None: only for mirror-symmetric data)
    aug_ramp: bool = False  # augmentation strength grows over the schedule
    progressive: float = 1.0  # progressive resizing: start at this fraction of the resolution
    tta_flip: bool = False  # evaluate on the image and its mirror image, averaged
    tta_shift: int = 0  # also on the image shifted this many pixels up, down, left and right, averaged (0 = off)
    tta_zoom: Tuple[float, ...] = ()  # also on the image's centre enlarged by each of these factors, averaged

    def __post_init__(self) -> None:
        """Each field checked on its own (a one-line ConfigError naming it), the model options included."""
        from .. import validate as v

        super().__post_init__()
        if self.model is not None and not isinstance(self.model, str):
            raise ConfigError(f"model must be a registered model name, got {self.model!r}", field="model")
        if not isinstance(self.model_args, dict):
            raise ConfigError(f"model_args must be a dict of ViTConfig options, got {self.model_args!r}",
                              field="model_args")
        ViTConfig.check_fields(self.model_args)
        v.choice(self.init_format, "init_format", ("vitkit", "timm", "hf", "npz", "torchvision"), optional=True)
        v.number(self.label_smoothing, "label_smoothing", lo=0, hi=1, hi_open=True)
        v.number(self.mixup, "mixup", lo=0)
        v.number(self.cutmix, "cutmix", lo=0)
        v.integer(self.eval_batch_size, "eval_batch_size", lo=1)
        v.number(self.progressive, "progressive", lo=0, hi=1, lo_open=True)
        v.integer(self.tta_shift, "tta_shift", lo=0)
        object.__setattr__(self, "tta_zoom", zoom_factors(self.tta_zoom))
        v.flag(self.hflip, "hflip", optional=True)
        for k in ("aug_ramp", "tta_flip"):
            v.flag(getattr(self, k), k)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Recipe fields that live in ClassifierConfig and TrainConfig (the rest are model fields)
_TASK_FIELDS = ("label_smoothing", "mixup", "cutmix", "augment", "hflip", "aug_ramp", "progressive", "tta_flip",
                "tta_shift", "tta_zoom")
_TRAIN_FIELDS = ("epochs", "time_budget", "batch_size", "lr", "min_lr", "weight_decay", "warmup", "clip_grad",
                 "ema_decay", "layer_decay", "precision", "compile")


def user_recipe(task: ClassifierConfig, train_cfg: TrainConfig, recipe: Optional[Recipe] = None) -> Recipe:
    """The choices a caller made: `recipe`'s set fields, plus every task/engine field given a value other than its
    dataclass default (so `TrainConfig(lr=3e-4)` counts as a choice; to fix a value equal to a default, put it in
    `recipe`), plus the model name and `model_args`."""
    chosen: Dict[str, object] = {}
    for obj, names in ((task, _TASK_FIELDS), (train_cfg, _TRAIN_FIELDS)):
        defaults = {f.name: f.default for f in dataclasses.fields(obj)}
        for n in names:
            v = getattr(obj, n)
            if v is not None and v != defaults.get(n):
                chosen[n] = v
    if task.model:
        chosen["model"] = task.model
    for k, v in task.model_args.items():
        if k in Recipe.__dataclass_fields__ and k not in ("model",):
            chosen[k] = v
    chosen.update((recipe or Recipe()).set_fields())
    return Recipe(**chosen)


def load_init(task: ClassifierConfig, recipe: Optional[Recipe] = None):
    """The pretrained model of `task.init`, any format `load_pretrained` reads, resampled to a requested
    `img_size`/`patch_size` (the head is replaced later, once the data has told the class count)."""
    from ..io import load_pretrained

    args = {**task.model_args, **{k: v for k, v in (recipe.set_fields() if recipe else {}).items()
                                  if k in ("num_heads", "img_size", "patch_size")}}
    return load_pretrained(task.init, fmt=task.init_format, model=task.model, num_heads=args.get("num_heads"),
                           img_size=args.get("img_size"), patch_size=args.get("patch_size"))


def model_config(recipe: Recipe, model_args: Optional[dict] = None,
                 sources: Optional[Dict[str, str]] = None) -> ViTConfig:
    """The ViT a resolved recipe describes: the named model (or vitkit's defaults) with the recipe's model fields
    that a flag or the plan chose (`sources`; all set fields when None), then `model_args` on top (options the
    recipe does not carry, e.g. qk_norm)."""
    base = get_config(recipe.model) if recipe.model else ViTConfig()
    over = {k: getattr(recipe, k) for k in MODEL_FIELDS if getattr(recipe, k) is not None
            and (sources is None or sources.get(k) != "default" or not recipe.model)}
    over.update(model_args or {})
    if over.get("global_pool", base.global_pool) == "token":
        over["class_token"] = True
    return base.replace(**over)


def build_classifier(task: ClassifierConfig, num_classes: int, pretrained=None, recipe: Optional[Recipe] = None,
                     sources: Optional[Dict[str, str]] = None):
    """The model a run trains: pretrained weights (`init`, loaded by `load_init`) with a new head for the data,
    or a fresh model from the recipe (a registered config, or the planner's architecture)."""
    args = dict(task.model_args)
    if task.init:
        from ..io import adapt_model

        model = pretrained if pretrained is not None else load_init(task)
        for k in ("img_size", "patch_size", "num_heads"):
            args.pop(k, None)
        gp = args.pop("global_pool", None)
        dpr = recipe.drop_path_rate if recipe is not None else None
        model = adapt_model(model, img_size=recipe.img_size if recipe is not None else None, num_classes=num_classes,
                            global_pool=gp)
        if dpr:  # stochastic depth for fine-tuning, on the pretrained blocks
            from ..models.vit import DropPath

            rates = torch.linspace(0, dpr, len(model.blocks)).tolist()
            for blk, r in zip(model.blocks, rates):
                blk.drop_path1 = blk.drop_path2 = DropPath(r) if r > 0 else torch.nn.Identity()
            model.config = model.config.replace(drop_path_rate=dpr)
        if args:
            log.warning("ignoring model options %s with --init (the pretrained architecture is kept)", sorted(args))
        return model.train()
    cfg = model_config(recipe or Recipe(model=task.model or "vit_mini_patch7_28"), args, sources)
    return create_model(config=cfg.replace(num_classes=num_classes))


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
def evaluate(model, dataset, *, batch_size: int = 500, device=None, full: bool = False,
             tta_flip: bool = False, tta_shift: int = 0, tta_zoom: Sequence[float] = (),
             dist_info: Optional[DistInfo] = None) -> dict:
    """val_loss, top1, top5 (in %) of `model` on `dataset`; with `full`, also per-class accuracy and the confusion
    matrix (rows = true class, columns = predicted). `tta_flip`, `tta_shift`, `tta_zoom`: scores from the average
    of the class probabilities over each image's test-time views (`classify_logits`). `dist_info` (a torchrun
    group): each process evaluates its slice of every batch and the counts are summed, so every process returns
    what one process would (the loss to float rounding)."""
    k = model.num_classes
    conf = torch.zeros(k, k, dtype=torch.long)
    loss_sum, n, top5 = 0.0, 0, 0
    rank, world = (dist_info.rank, dist_info.world) if dist_info is not None else (0, 1)
    for x, y in eval_batches(model, dataset, batch_size, device, rank=rank, world=world):
        if len(y) == 0:  # a last batch smaller than the number of processes leaves some of them none
            continue
        logits = classify_logits(model, x, tta_flip, tta_shift, tta_zoom)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        pred = logits.argmax(-1)
        top5 += (logits.topk(min(5, k), -1).indices == y[:, None]).any(-1).sum().item()
        conf += torch.bincount((y * k + pred).cpu(), minlength=k * k).view(k, k)
        n += len(y)
    if world > 1:  # in rank order on every rank: the same sums everywhere
        parts = all_gather_obj((loss_sum, n, top5, conf), dist_info)
        loss_sum, n, top5 = (sum(p[i] for p in parts) for i in range(3))
        conf = sum(p[3] for p in parts)
    out = {"val_loss": loss_sum / max(1, n), "top1": 100.0 * conf.diag().sum().item() / max(1, n),
           "top5": 100.0 * top5 / max(1, n)}
    if full:
        per = conf.diag().float() / conf.sum(1).clamp(min=1).float() * 100
        out.update({"num_images": n, "per_class": per.tolist(), "confusion": conf.tolist()})
    return out


def classify_logits(model, x: torch.Tensor, tta_flip: bool = False, tta_shift: int = 0,
                    tta_zoom: Sequence[float] = ()) -> torch.Tensor:
    """Logits (B, K) in fp32. With test-time views, the log of the mean class probabilities over them: the image;
    its centre enlarged by each factor of `tta_zoom` (multi-scale testing: the classic centre crops); the image
    shifted `tta_shift` pixels left, right, up and down (reflection at the border); and with `tta_flip` the mirror
    image of each."""
    n = tta_view_count(tta_flip, tta_shift, tta_zoom)
    if n == 1:
        return model(x).float()
    probs = sum(model(v).float().softmax(-1) for v in _test_views(x, tta_flip, tta_shift, tta_zoom)) / n
    return probs.clamp(min=1e-12).log()


def _test_views(x: torch.Tensor, flip: bool, shift: int, zoom: Sequence[float] = ()):
    """The views one at a time (a batch of large images times ten would not fit twice over)."""
    moves = ((1, 0), (-1, 0), (0, 1), (0, -1)) if shift else ()
    for v in itertools.chain([x], (zoom_image(x, z) for z in zoom), (shift_image(x, *d, shift) for d in moves)):
        yield v
        if flip:
            yield v.flip(-1)


def shift_image(x: torch.Tensor, dx: int, dy: int, pixels: int) -> torch.Tensor:
    """`x` (B, C, H, W) moved `pixels` * (dx, dy) (content right/down for positive), the border reflected."""
    p = min(pixels, x.shape[-1] - 1, x.shape[-2] - 1)  # reflection needs the pad below the side
    h, w = x.shape[-2:]
    xp = F.pad(x, (p, p, p, p), mode="reflect")
    return xp[..., p - dy * p:p - dy * p + h, p - dx * p:p - dx * p + w]


def zoom_image(x: torch.Tensor, factor: float) -> torch.Tensor:
    """The centre 1/`factor` of `x` (B, C, H, W) enlarged back to H x W (bilinear)."""
    theta = torch.tensor([[1 / factor, 0.0, 0.0], [0.0, 1 / factor, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def tta_of(extra: dict, where: str = "the checkpoint") -> Tuple[bool, int, Tuple[float, ...]]:
    """The test-time views a classifier records (`pretrained_cfg`): (flip, shift in pixels, zoom factors)."""
    shift, zoom = extra.get("tta_shift", 0), extra.get("tta_zoom", [])
    if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
        raise CheckpointError(f"{where} records tta_shift {shift!r}, not a pixel count >= 0; the checkpoint is "
                              "damaged: re-save it with vitkit.save")
    try:
        zoom = zoom_factors(zoom)
    except ConfigError:
        raise CheckpointError(f"{where} records tta_zoom {zoom!r}, not a list of factors in (1, 2]; the checkpoint "
                              "is damaged: re-save it with vitkit.save") from None
    return bool(extra.get("tta_flip")), shift, zoom


def _pretrained_cfg(info, model, tta_flip: bool = False, tta_shift: int = 0,
                    tta_zoom: Sequence[float] = ()) -> dict:
    """What a trained classifier records: the data's normalisation and class names, bicubic, no crop."""
    return dataclasses.replace(Preprocessing.default(model.config), mean=tuple(info.mean), std=tuple(info.std),
                               class_names=tuple(info.class_names),
                               extra={"dataset": info.spec, "tta_flip": bool(tta_flip),
                                      "tta_shift": int(tta_shift), "tta_zoom": list(tta_zoom)}).to_dict()


def train_classifier(task: ClassifierConfig, train_cfg: TrainConfig, *, recipe: Optional[Recipe] = None,
                     on_epoch_end: Optional[Callable] = None, started: Optional[float] = None) -> dict:
    """Train a ViT classifier on `task.data` with the engine; writes the run folder and returns the summary.

    The recipe is resolved field by field: the caller's choice (`recipe`, or a task/engine field set to a
    non-default value), else the planner's (`vitkit.tasks.plan`, from the data's profile and steps measured on
    this machine), else the default. A time budget covers everything from `started` (default: now): scanning,
    planning, training and the final report."""
    clock = Trainer.clock
    started = clock() if started is None else started
    # the run folder is claimed (locked) before the data is read: a name clash is reported at once
    with claim_run(train_cfg, is_main=os.environ.get("RANK", "0") == "0") as run:
        if train_cfg.resume:
            task, train_cfg, recipe = _resume(task, train_cfg, recipe)
        return _train(task, train_cfg, recipe, on_epoch_end, started, run)


def _resume(task: ClassifierConfig, train_cfg: TrainConfig, recipe: Optional[Recipe]):
    """The configs and recipe a run folder was started with, for --resume; of the caller's choices only
    --epochs / --time-budget (and the engine's resume-safe fields) may differ, the rest is refused."""
    saved = RunDir.to_resume(train_cfg.resume).read_config().get("recipe", {})
    values = dict(saved.get("values") or {})
    requested = {k: v for k, v in (recipe.set_fields() if recipe is not None else {}).items()
                 if v != values.get(k)}
    task, train_cfg = resume_configs(train_cfg, "classify", "classifier", ClassifierConfig, "a classifier run",
                                     new_task=task, requested=requested)
    if not values:
        return task, train_cfg, user_recipe(task, train_cfg)
    values.update(epochs=train_cfg.epochs, time_budget=train_cfg.time_budget)  # what the resume may change
    return task, train_cfg, Recipe.from_dict(values)


def _train(task: ClassifierConfig, train_cfg: TrainConfig, recipe: Optional[Recipe], on_epoch_end, started,
           run) -> dict:
    """train_classifier once its run folder is claimed."""
    clock = Trainer.clock
    torch.manual_seed(train_cfg.seed)  # the same initial weights in every process and every repeat
    planned = None
    user = user_recipe(task, train_cfg, recipe)
    phases: Dict[str, float] = {}  # where the time before the first step went (reported with the plan)
    t = clock()
    src = task.open(train_cfg.seed)
    profile = src.profile()
    phases["scan"], t = clock() - t, clock()
    pretrained = load_init(task, user) if task.init else None
    dev = resolve_device(train_cfg.device)
    budget = user.time_budget if user.time_budget is not None else \
        (None if user.epochs is not None else (train_cfg.time_budget or DEFAULT_BUDGET))
    if not train_cfg.resume:
        planned = _plan(task, user, profile, src, budget, clock() - started, dev, pretrained)
    phases["plan"], t = clock() - t, clock()
    final, sources = resolve(user, planned.recipe if planned is not None else None)
    if planned is not None:
        planned.note_flags(final, sources)
    if budget is not None and final.time_budget is None:
        final, sources["time_budget"] = final.replace(time_budget=budget), "default"
    task, train_cfg = _apply(final, task, train_cfg)
    # the data, shaped for the model; the model
    cfg = pretrained.config if pretrained is not None else model_config(final, task.model_args, sources)
    if pretrained is not None and final.img_size:
        cfg = cfg.replace(img_size=final.img_size)
    norm = {}
    pcfg = getattr(pretrained, "pretrained_cfg", None) or {}  # what it records, not the defaults: without a record
    if pcfg.get("mean") and pcfg.get("std"):                  # the data's own statistics normalise
        norm = {"mean": tuple(pcfg["mean"]), "std": tuple(pcfg["std"])}
    size = cfg.img_size if isinstance(cfg.img_size, int) else min(cfg.img_size)
    prog = final.progressive if final.progressive and final.progressive < 1 else None
    hflip = profile.mirror_symmetric if task.hflip is None else task.hflip
    aug = _augment_config(task.augment, src.info.kind or ("natural" if hflip else "oriented"), hflip, final)
    train, val, info = build_datasets(src, img_size=cfg.img_size, in_chans=cfg.in_chans, aug=aug,
                                      augment=task.augment, seed=train_cfg.seed, max_train=task.max_train,
                                      max_val=task.max_val, min_size=int(round(prog * size)) if prog else None,
                                      multiple=cfg.patch_size, strict=task.strict, progress=not train_cfg.quiet,
                                      **norm)
    phases["decode"], t = clock() - t, clock()
    if final.precision == "bf16" and sources.get("precision") == "plan" and not train_cfg.resume:
        final, sources, train_cfg = _check_precision(final, sources, train_cfg, cfg, train, planned, info)
        phases["precision check"] = clock() - t
    torch.manual_seed(train_cfg.seed)
    model = build_classifier(task, info.num_classes, pretrained, final, sources)
    if model.config.in_chans != info.in_chans:
        raise ConfigError(f"the model takes {model.config.in_chans} channels but the data was built with "
                          f"{info.in_chans}")
    model.pretrained_cfg = _pretrained_cfg(info, model, task.tta_flip, task.tta_shift, task.tta_zoom)
    mixup = MixUp(info.num_classes, task.mixup, task.cutmix, smoothing=task.label_smoothing,
                  ramp=0.5 if task.aug_ramp else 0.0) if (task.mixup or task.cutmix) else None
    if src.held_out_is_test and train_cfg.best_metric == "top1":
        train_cfg = dataclasses.replace(train_cfg, best_metric="")  # a test split reports; it never chooses
    if not isinstance(train, InMemoryDataset) and train_cfg.workers == 0:  # streamed from disk: decode in workers
        train_cfg = dataclasses.replace(train_cfg, workers=max(1, min(4, (os.cpu_count() or 2) - 1)))
    resolved = {"task": "classify", "classifier": task.to_dict(), "model": model.config.to_dict(),
                "data": {**info.to_dict(), "held_out_is_test": src.held_out_is_test},
                "recipe": {"values": final.to_dict(), "sources": sources,
                           "reasons": planned.reasons if planned is not None else {},
                           "measurements": planned.measurements if planned is not None else {}},
                "profile": profile.to_dict(),
                "eval_views": tta_view_count(task.tta_flip, task.tta_shift, task.tta_zoom)}
    last_eval: Dict[str, dict] = {}

    def eval_fn(m):
        ev = evaluate(m, val, batch_size=task.eval_batch_size, full=True, tta_flip=task.tta_flip,
                      tta_shift=task.tta_shift, tta_zoom=task.tta_zoom)
        last_eval["ev"] = ev
        return {k: ev[k] for k in ("val_loss", "top1", "top5")}

    def end_fn(trainer, summary):
        return _final_report(trainer, val, info, task, last_eval.get("ev"), bad=getattr(train, "skipped", 0))

    main_rank = os.environ.get("RANK", "0") == "0"
    if main_rank and not train_cfg.resume:
        _print_plan(info, profile, final, sources, planned, model, budget, clock() - started, src, phases)
    step_cost = None
    if prog and isinstance(train.transform, BatchTransform):
        tf = train.transform
        step_cost = lambda p: 0.2 + 0.8 * (min(tf.size_at(p)) / size) ** 2  # noqa: E731 - tokens grow with area
    trainer = Trainer(model, train, train_cfg, classification_loss(task.label_smoothing), eval_fn,
                      resolved=resolved, end_fn=end_fn, on_epoch_end=on_epoch_end,
                      loader_kwargs={"mixup": mixup} if mixup else None, time_spent=clock() - started,
                      reserve=_report_seconds(planned, final, len(val)), step_cost=step_cost, run=run)
    return trainer.fit()


def _report_seconds(planned: Optional[Plan], final: Recipe, n_val: int) -> float:
    """Seconds the final report needs after training: plots and files, plus an fp32 evaluation of the best
    checkpoint when training evaluated in another precision (a forward is ~1/3 of a training step, times the
    test-time views)."""
    secs = 3.0
    times = (planned.measurements.get("precision_seconds") or {}) if planned is not None else {}
    if final.precision != "fp32" and times:
        per_img = times.get("fp32", 2.5 * min(times.values())) / max(1, final.batch_size or 128)
        secs += n_val * per_img / 3 * tta_view_count(bool(final.tta_flip), final.tta_shift or 0,
                                                      final.tta_zoom or ())
    return secs


def _plan(task, user: Recipe, profile, src, budget, spent, device, pretrained) -> Plan:
    """Run the planner with a timer that measures a real training step of each candidate on this machine."""
    from ..train.probe import step_seconds

    batch = user.batch_size or None
    precisions = ("fp32", "bf16") if bf16_native(device) else ("fp32",)  # the planner still measures
    if user.precision:
        precisions = (user.precision,)
    cache: Dict[tuple, float] = {}

    def timer(fields: dict, precision: str) -> float:
        key = (json.dumps(fields, sort_keys=True), precision)
        if key not in cache:
            if pretrained is not None:
                net = copy.deepcopy(pretrained)
                net.set_input_size(img_size=fields["img_size"])
                net.reset_classifier(profile.num_classes)
            else:
                net = create_model(config=ViTConfig.from_dict({**ViTConfig().to_dict(), **fields,
                                                               "num_classes": profile.num_classes}))
            b = plan_batch or 128
            side = fields.get("img_size") or net.config.img_size
            cache[key] = step_seconds(net, (b, net.config.in_chans, side, side), profile.num_classes,
                                      precision=precision, steps=3, warmup=2, device=device)
        return cache[key]

    def compile_timer(fields: dict, precision: str):
        net = create_model(config=ViTConfig.from_dict({**ViTConfig().to_dict(), **fields,
                                                       "num_classes": profile.num_classes}))
        side = fields.get("img_size") or net.config.img_size
        t = time.perf_counter()
        sec = step_seconds(net, (plan_batch, net.config.in_chans, side, side), profile.num_classes,
                           precision=precision, steps=3, warmup=2, device=device, compile=True)
        return sec, time.perf_counter() - t - 5 * sec

    from .plan import _batch_for

    plan_batch = batch or _batch_for(profile.num_train)
    init = pretrained.config.to_dict() if pretrained is not None else None
    fixed = None
    if user.model is not None and pretrained is None:
        fixed = model_config(user, task.model_args).to_dict()
        fixed.pop("num_classes", None)
    return plan_recipe(profile, user, budget=budget, spent=spent, timer=timer, precisions=precisions, init=init,
                       held_out_is_test=src.held_out_is_test, fixed_fields=fixed,
                       compile_timer=compile_timer if pretrained is None else None)


def _check_precision(final, sources, train_cfg, cfg, train, planned, info):
    """bf16 was measured faster; keep it only if a paired run shows it trains as well as fp32 on held-out images."""
    g = torch.Generator().manual_seed(0)
    n = len(train)
    b = min(final.batch_size or 128, max(8, n // 4))
    times = planned.measurements.get("precision_seconds") or {}
    pair = sum(times.values()) or 1.0  # one fp32 and one bf16 step
    steps = 20 if final.time_budget is None else int(min(20, 0.03 * final.time_budget / pair))
    if steps < 6:  # the budget cannot pay for a check that means anything: not assumed, so fp32
        planned.reasons["precision"] = (f"fp32: bf16 measured faster, but checking that it trains as well would take "
                                        f"over 3% of the budget ({pair:.2f} s per pair of steps)")
        return final.replace(precision="fp32"), sources, dataclasses.replace(train_cfg, precision="fp32")
    if isinstance(train, ShardDataset):  # streamed: no random access to single images
        batches, held_batches = _shard_check_batches(train, b, steps)
        if not held_batches:
            planned.reasons["precision"] = ("fp32: bf16 measured faster, but the training shards are too few to hold "
                                            "some out for checking that it trains as well")
            return final.replace(precision="fp32"), sources, dataclasses.replace(train_cfg, precision="fp32")
        return _precision_verdict(final, sources, train_cfg, cfg, info, planned, batches, held_batches)
    order = torch.randperm(n, generator=g)
    held = order[: min(512, n // 4)]
    rest = order[len(held):]
    batches = []
    for i in range(steps):
        idx = rest[torch.arange(i * b, (i + 1) * b) % len(rest)]
        x = train.transform(train.images[idx], torch.Generator().manual_seed(i), progress=1.0) \
            if isinstance(train, InMemoryDataset) else torch.stack([train[j][0] for j in idx.tolist()])
        y = train.labels[idx] if isinstance(train, InMemoryDataset) else torch.tensor([train[j][1] for j in idx.tolist()])
        batches.append((x, y))
    ev = BatchTransform(train.transform.size, train.transform.mean.flatten().tolist(),
                        train.transform.std.flatten().tolist()) if isinstance(train, InMemoryDataset) else None
    held_batches = []
    for i in range(0, len(held), 256):
        idx = held[i:i + 256]
        x = ev(train.images[idx], None) if ev is not None else torch.stack([train[j][0] for j in idx.tolist()])
        held_batches.append((x, train.labels[idx] if ev is not None else torch.tensor([train[j][1] for j in idx.tolist()])))
    return _precision_verdict(final, sources, train_cfg, cfg, info, planned, batches, held_batches)


def _shard_check_batches(train: ShardDataset, b: int, steps: int):
    """For the bf16 check on shards: `steps` augmented training batches from all but the last training shards, and
    the last shards (up to ~512 images, at most a quarter of the set) unaugmented as the held-out ones; ([], [])
    when there is a single shard."""
    import itertools

    from ..data import make_loader
    from ..data.shards import ShardSplit

    sp = train.split
    k, held_n = 0, 0
    while k < len(sp) - 1 and held_n < min(512, sp.num_samples // 4):
        k += 1
        held_n += sp.lengths[-k]
    if k == 0:
        return [], []

    def part(sl):
        return ShardDataset(ShardSplit(sp.name, sp.urls[sl], sp.lengths[sl], sp.sha256[sl], sp.sizes[sl]),
                            train.num_classes, train.in_chans, train.side, info_path=train.info_path)

    rest, held = part(slice(0, len(sp) - k)), part(slice(len(sp) - k, None))
    rest.transform = train.transform
    held.transform = BatchTransform(train.transform.size, train.transform.mean.flatten().tolist(),
                                    train.transform.std.flatten().tolist())
    first = list(itertools.islice(make_loader(rest, b, train=True, seed=0, epoch=0), steps))
    return list(itertools.islice(itertools.cycle(first), steps)), \
        list(make_loader(held.limited(min(512, held_n)), 256, train=False))


def _precision_verdict(final, sources, train_cfg, cfg, info, planned, batches, held_batches):
    """Keep bf16 if, trained on `batches` from the same start, it reaches fp32's held-out loss (within tolerance)."""
    from ..train.probe import precision_agrees

    ok, stats = precision_agrees(lambda: create_model(config=cfg.replace(num_classes=info.num_classes)), batches,
                                 held_batches, "bf16", lr=final.lr or 1e-3)
    planned.measurements["bf16_check"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}
    if ok:
        planned.reasons["precision"] = (f"bf16 autocast: faster here, and after {stats['steps']} paired steps from "
                                        f"the same start its held-out loss is {stats['loss_bf16']:.3f} vs fp32's "
                                        f"{stats['loss_fp32']:.3f} (from {stats['loss_before']:.3f})")
        return final, sources, train_cfg
    planned.reasons["precision"] = (f"fp32: bf16 was faster, but after {stats['steps']} paired steps its held-out loss "
                                    f"is {stats['loss_bf16']:.3f} vs fp32's {stats['loss_fp32']:.3f} (from "
                                    f"{stats['loss_before']:.3f}): not within {100 * stats['tolerance']:.0f}% of "
                                    "fp32's progress, or too little progress to tell")
    final = final.replace(precision="fp32")
    return final, sources, dataclasses.replace(train_cfg, precision="fp32")


def _augment_config(level: str, kind: str, hflip: bool, final: Recipe):
    """The batch augmentation of a resolved recipe: the level's affine and RandAugment settings, flips as decided,
    ramped in over the first half of the schedule when `aug_ramp`."""
    from ..data import default_augment

    if level == "none":
        return None
    aug = default_augment(kind, level)
    return dataclasses.replace(aug, hflip=bool(hflip), ramp=0.5 if final.aug_ramp else 0.0)


def _apply(final: Recipe, task: ClassifierConfig, train_cfg: TrainConfig):
    """Write a resolved recipe's values into the task and engine configs."""
    t = {k: getattr(final, k) for k in _TASK_FIELDS if getattr(final, k) is not None}
    e = {k: getattr(final, k) for k in _TRAIN_FIELDS if getattr(final, k) is not None or k in ("epochs",)}
    if e.get("time_budget") is not None and final.epochs is None:
        e["epochs"] = None
    return dataclasses.replace(task, **t), dataclasses.replace(train_cfg, **e)


def _print_plan(info, profile, final: Recipe, sources, planned, model, budget, spent, src, phases=None) -> None:
    """The plan and its reasons, a few lines before the first step (stderr through logging)."""
    c = model.config
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    head = (f"plan for {info.spec}: {info.num_train:,} train / {info.num_val:,} held-out images"
            f"{' (a test split: reported, never used to choose)' if src.held_out_is_test else ''}, "
            f"{info.num_classes} classes, native {profile.native_size[0]}x{profile.native_size[1]} "
            f"{'grey' if profile.grey else 'colour'}; "
            + (f"budget {budget / 60:.1f} min for the whole command ({spent:.0f} s used so far)"
               + (" — the default: pass --time-budget or --epochs" if sources.get("time_budget") == "default" else "")
               if budget else f"{final.epochs} epochs"))
    lines = [head, f"  model: {c.name or 'custom'} — {c.img_size} px, patch {c.patch_size} ({c.stem} stem), width "
                   f"{c.embed_dim}, depth {c.depth}, {c.num_heads} heads, mlp {c.mlp_ratio:g}: {n_params:.2f}M params"]
    for k, v in (planned.reasons.items() if planned is not None else []):
        lines.append(f"  {k}: {v}")
    if phases:
        lines.append("  before training: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()))
    flags = sorted(k for k, v in sources.items() if v == "flag")
    if flags:
        lines.append(f"  from your flags: {', '.join(flags)}")
    log.info("\n".join(lines))


def _final_report(trainer, val, info, task: ClassifierConfig, last: Optional[dict] = None, bad: int = 0) -> dict:
    """After training: the best checkpoint evaluated in full (the last evaluation's, when the best is the last
    epoch); learning curves and confusion matrix as PNG. `bad`: samples the training stream left out (shards: this
    process's count), reported with the files the scan skipped."""
    from ..io import load

    run = trainer.run.path
    if last is not None and trainer.best_epoch == trainer.epoch and trainer.cfg.precision == "fp32":
        ev = last  # the same weights, already evaluated as `vitkit eval` would (fp32)
    else:
        best = load(run / "best.safetensors").to(trainer.device)
        ev = evaluate(best, val, batch_size=task.eval_batch_size, full=True, tta_flip=task.tta_flip,
                      tta_shift=task.tta_shift, tta_zoom=task.tta_zoom)
    plot_learning_curves(trainer.history, run / "curves.png")
    plot_confusion(ev["confusion"], info.class_names, run / "confusion.png", title=f"{run.name}: top-1 "
                   f"{ev['top1']:.2f}%")
    md = ["## Best checkpoint on the held-out images", "",
          f"- top-1 **{ev['top1']:.2f}%**, top-5 {ev['top5']:.2f}%, loss {ev['val_loss']:.4f} "
          f"on {ev['num_images']} images ({info.spec})",
          "- per class: " + ", ".join(f"{n} {a:.1f}%" for n, a in zip(info.class_names, ev["per_class"])),
          f"- skipped unreadable images: {len(info.skipped) + bad}", "",
          "![learning curves](curves.png) ![confusion matrix](confusion.png)", ""]
    return {"eval": {k: ev[k] for k in ("top1", "top5", "val_loss", "num_images", "per_class")},
            "skipped_images": len(info.skipped) + bad, "markdown": "\n".join(md)}


# ---- evaluate and predict a checkpoint ------------------------------------------------------------------------
def load_classifier(path, device="cpu", fast: bool = False, tome: int = 0, precision: str = "auto"):
    """A vitkit classifier checkpoint (or run folder) → model in eval mode, with its class names.
    `fast` runs the fast path (`vitkit.optimize`) in `precision` ("auto": the fastest that agrees with fp32 on the
    first batch; "fp32" is exact); `tome` > 0 merges that many tokens per block."""
    from ..io.checkpoint import load_vit

    model = load_vit(path, "classifying").to(device)
    if model.num_classes <= 0:
        raise CheckpointError(f"{str(path)!r} holds a model without a classification head; it cannot classify")
    names = (model.pretrained_cfg or {}).get("class_names") or [str(i) for i in range(model.num_classes)]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, (str, int)) for n in names):
        raise CheckpointError(f"{str(path)!r} records its class names as {type(names).__name__} {str(names)[:60]!r}, "
                              "not a list of names; the checkpoint is damaged: re-save it with vitkit.save")
    names = [str(n) for n in names]
    if len(names) != model.num_classes:
        raise CheckpointError(f"{str(path)!r} names {len(names)} classes but its head has {model.num_classes}")
    if fast or tome:
        from ..models.fast import optimize

        model = optimize(model, tome_r=tome, backend="auto" if fast else "eager",
                         precision=precision if fast else "fp32", calibration="first")
    return model, list(names)


def parse_class_map(text) -> Dict[str, str]:
    """--class-map: 'FOLDER=CLASS,...' pairs, or a JSON file holding {"FOLDER": "CLASS", ...} → a dict."""
    if isinstance(text, dict):
        pairs = text
    elif str(text).endswith(".json") or Path(str(text)).is_file():
        try:
            pairs = json.loads(Path(text).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"class_map: cannot read {str(text)!r} as a JSON object of FOLDER: CLASS names "
                              f"({type(e).__name__})", field="class_map") from None
    else:
        pairs = {}
        for item in filter(None, (t.strip() for t in str(text).split(","))):
            a, eq, b = item.partition("=")
            if not eq or not a.strip() or not b.strip():
                raise ConfigError(f"class_map must be FOLDER=CLASS pairs separated by commas, or a JSON file, got "
                                  f"{item!r}", field="class_map")
            pairs[a.strip()] = b.strip()
    if not isinstance(pairs, dict) or not pairs or not all(isinstance(k, str) and isinstance(v, str) and v
                                                            for k, v in pairs.items()):
        raise ConfigError(f"class_map must map folder class names to the checkpoint's class names, got {text!r}",
                          field="class_map")
    return dict(pairs)


def _short(names: Sequence[str], n: int = 12) -> str:
    shown = ", ".join(repr(x) for x in list(names)[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def match_classes(data_names: Sequence[str], model_names: Sequence[str], *, named: bool = True,
                  class_map: Optional[Dict[str, str]] = None, data: str = "the data") -> List[int]:
    """The checkpoint's class index of each of the data's classes, matched by name (after `class_map`, data name →
    checkpoint name). The data may hold a subset of the checkpoint's classes; a class it does not know is an error
    that lists them. `named=False` (the checkpoint records no names): by position, which needs the same count."""
    data_names, model_names = [str(n) for n in data_names], [str(n) for n in model_names]
    if class_map:
        stray = sorted(set(class_map) - set(data_names))
        if stray:
            raise ConfigError(f"class_map names classes that {data} does not have: {_short(stray)}; its classes: "
                              f"{_short(data_names)}", field="class_map")
    if not named and not class_map:
        if len(data_names) != len(model_names):
            raise CheckpointError(f"the checkpoint classifies {len(model_names)} classes (no names recorded) but "
                                  f"{data} has {len(data_names)}; evaluate it on the data it was trained for")
        log.warning("the checkpoint records no class names: scoring %s's classes by position", data)
        return list(range(len(data_names)))
    mapped = [(class_map or {}).get(n, n) for n in data_names]
    index = {n: i for i, n in enumerate(model_names)}
    unknown = [n if m == n else f"{n}={m}" for n, m in zip(data_names, mapped) if m not in index]
    if unknown:
        raise DataError(f"{data} has {len(unknown)} class(es) the checkpoint does not know: {_short(unknown)}; its "
                        f"{len(model_names)} classes are {_short(model_names)}; rename those folders or map them "
                        "with --class-map FOLDER=CLASS,... (or a JSON file)")
    return [index[m] for m in mapped]


def _relabel(ds, lut: List[int]):
    """`ds` with each label y replaced by lut[y] (the data's class index → the checkpoint's)."""
    if lut == list(range(len(lut))):
        return ds
    table = torch.tensor(lut, dtype=torch.long)
    if isinstance(ds, ShardDataset):
        return ds.relabel(lut)
    if isinstance(ds, InMemoryDataset):
        return InMemoryDataset(ds.images, table[ds.labels], ds.transform)
    ds.samples = [(f, lut[y]) for f, y in ds.samples]
    return ds


def evaluate_checkpoint(path, data: Optional[str] = None, *, out_dir=None, batch_size: int = 500, device="auto",
                        data_dir="data", download=False, val_split: Optional[float] = None,
                        seed: Optional[int] = None, strict: bool = False, max_val: Optional[int] = None,
                        fast: bool = False, tome: int = 0, class_map: Optional[Dict[str, str]] = None,
                        precision: str = "auto") -> dict:
    """Top-1/top-5, per-class accuracy and confusion matrix of a checkpoint on a dataset's validation split;
    writes eval.json and eval_confusion.png into `out_dir` (default: the run folder, or next to the file).
    Classes are matched by name (`match_classes`): the data may hold a subset of the checkpoint's classes, and
    `class_map` {data name: checkpoint name} maps the ones named otherwise. `val_split`/`seed` (how a
    PATH/<class>/* folder is split) default to the run's own, so the held-out images are the ones the run held out.
    `data` defaults to the dataset the checkpoint was trained on. Under torchrun (WORLD_SIZE > 1) every process
    calls it: each evaluates its slice of every batch, all get the one-process result, rank 0 writes the files."""
    import json

    from .. import validate as v
    from ..io.checkpoint import read_pretrained_cfg

    data = data or read_pretrained_cfg(path).get("dataset")  # without building the model
    if not data:
        raise ConfigError("the checkpoint does not record its dataset; pass --data (e.g. --data mnist5k)")

    v.integer(batch_size, "batch_size", lo=1)
    v.integer(max_val, "max_val", lo=1, optional=True)
    v.integer(tome, "tome", lo=0)
    if val_split is not None and not str(data).startswith("folder:"):
        raise ConfigError(f"val_split applies to folder:PATH data only; {data} has a fixed held-out split",
                          field="val_split")
    class_map = parse_class_map(class_map) if class_map else None
    p = Path(path)
    try:
        saved = RunDir.open(p if p.is_dir() else p.parent).read_config(missing_ok=True) or {}
    except ConfigError:
        saved = {}  # not a run's config (or a damaged one): the defaults below
    if val_split is None:
        val_split = (saved.get("classifier") or {}).get("val_split", 0.1)
    if seed is None:
        seed = (saved.get("train") or {}).get("seed", 0)
    dist_info = setup_distributed(device)  # under torchrun: join the group, each process takes its part
    dev = dist_info.device
    model, names = load_classifier(path, dev, fast=fast, tome=tome, precision=precision)
    pre = Preprocessing.of(model)
    c = model.config
    _, val, info = build_datasets(data, img_size=c.img_size, in_chans=c.in_chans, augment="none",
                                  mean=pre.mean, std=pre.std, crop_pct=pre.crop_pct,
                                  data_dir=data_dir, download=download, val_split=val_split, seed=seed,
                                  strict=strict, max_val=max_val)
    lut = match_classes(info.class_names, names, named=bool(pre.class_names), class_map=class_map,
                        data=repr(info.spec))
    val = _relabel(val, lut)
    flip, shift, zoom = tta_of(pre.extra, repr(str(path)))
    ev = evaluate(model, val, batch_size=batch_size, device=dev, full=True, tta_flip=flip, tta_shift=shift,
                  tta_zoom=zoom, dist_info=dist_info)
    present = sorted(set(lut))  # the checkpoint's classes the data holds
    out = Path(out_dir) if out_dir else (p if p.is_dir() else p.parent)
    out.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": str(path), "data": info.spec, "num_images": ev["num_images"],
              "top1": round(ev["top1"], 3), "top5": round(ev["top5"], 3), "val_loss": round(ev["val_loss"], 5),
              "per_class": {str(names[i]): round(ev["per_class"][i], 2) for i in present},
              "confusion": ev["confusion"], "class_names": names, "skipped_images": len(info.skipped),
              "fast": bool(fast), "tome_r": int(tome), **precision_record(model)}
    if len(present) < len(names) or class_map:
        result["data_classes"] = {str(n): str(names[i]) for n, i in zip(info.class_names, lut)}
    from ..io.checkpoint import atomic_write

    text = json.dumps(result, indent=2) + "\n"
    if dist_info.is_main:  # under torchrun every process holds the same result; one writes it
        atomic_write(out / "eval.json", lambda tmp: Path(tmp).write_text(text))
        plot_confusion(ev["confusion"], names, out / "eval_confusion.png",
                       title=f"{info.spec}: top-1 {ev['top1']:.2f}%")
    result["outputs"] = [str(out / "eval.json"), str(out / "eval_confusion.png")]
    return result


@torch.no_grad()
def predict(checkpoint, paths: Sequence, *, topk: int = 5, batch_size: int = 64, device="auto",
            strict: bool = False, fast: bool = False, tome: int = 0, precision: str = "auto") -> List[dict]:
    """Top-k labels (by name) with probabilities for each image; images are batched. Unreadable images are
    reported with an 'error' entry (or raise with `strict`); NaN or infinite outputs are a CheckpointError."""
    from .. import validate as v
    from ..io.checkpoint import check_finite_outputs

    v.integer(topk, "topk", lo=1)
    v.integer(batch_size, "batch_size", lo=1)
    v.integer(tome, "tome", lo=0)
    dev = resolve_device(device)
    model, names = load_classifier(checkpoint, dev, fast=fast, tome=tome, precision=precision)
    pre, c = Preprocessing.of(model), model.config
    views = tta_of(pre.extra, repr(str(checkpoint)))
    tf = eval_transform(pre, c.img_size)
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
        logits = classify_logits(model, torch.stack(xs).to(dev), *views)
        check_finite_outputs(logits, str(checkpoint), [files[j] for j in ok])
        p, idx = logits.softmax(-1).topk(k, -1)
        for j, pr, ix in zip(ok, p.tolist(), idx.tolist()):
            results[j] = {"path": str(files[j]), "label": names[ix[0]], "prob": round(pr[0], 5),
                          "topk": [{"label": names[t], "prob": round(q, 5)} for t, q in zip(ix, pr)]}
    return results
