"""The training planner: derive a classifier's recipe from the data and the clock.

    prof = source.profile()                         # counts, sizes, colour, mirror symmetry (measured)
    plan = plan_recipe(prof, user, budget=3600, timer=timer)   # `timer` measures candidate steps here
    plan.recipe, plan.reasons                       # a `Recipe` with every free field chosen, and why

The rules are about the data and the budget only (no data set is known by name):
- resolution: the images' own size when small; larger images are brought down to what the budget affords;
- tokens: an 8x8 grid or so (7x7 for 28-px digits, 4x4 for 8-px ones) through a convolutional stem whose
  stride-2 convolutions reach it (Xiao et al. 2021), a plain patchify conv where the patch is not a power of two;
  small images (<= 32 px) get one more 3x3 conv at full resolution first, which sees every pixel's neighbours
  before the first stride-2 conv skips half of them (CCT's tokenizer; measured here, docs/training.md);
- model: from a ladder of widths and depths, the largest whose measured step time still buys 1.5x the number of
  epochs this much data needs (`epochs_needed`, `LADDER_EPOCHS`), so time goes where it pays: a wider model or
  more passes (measured side by side: more passes of a smaller model win until then);
- precision: bf16 autocast where it measures faster than fp32 on the chosen model (each rung timed in both when
  the budget is an hour-scale one) and a paired check on held-out images shows it
  trains as well (`vitkit.train.probe`), else fp32;
- augmentation and regularisation: weak for short schedules, growing with the number of epochs the budget buys
  (flips only for mirror-symmetric data); label smoothing, EMA over the last ~5% of steps;
- evaluation: test-time flip averaging for mirror-symmetric data; checkpoints chosen only on a validation split,
  never on a test split.
With `init` (fine-tuning), the architecture is the checkpoint's and the plan picks resolution, learning rate,
layer decay, warm-up and lighter regularisation instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from ..data.profile import DataProfile
from .recipe import Recipe, tta_view_count

# (embed_dim, depth, num_heads, mlp_ratio), cheapest first. MLP ratio 2 for the small ones: on small data the
# narrower MLP trains as well per epoch and runs faster (CCT/ViT-Lite recipes; measured here, README).
LADDER: List[Tuple[int, int, int, float]] = [
    (64, 4, 2, 2.0), (96, 6, 3, 2.0), (128, 6, 4, 2.0), (192, 6, 3, 2.0), (192, 9, 3, 2.0),
    (256, 8, 4, 2.0), (384, 8, 6, 2.0), (384, 12, 6, 4.0),
]
# A bigger rung is taken only where it still gets this multiple of `epochs_needed`: side by side on 45,000 CIFAR-10
# images for an hour, the model of ~65 passes beat each bigger one that got 38-45 (1.2-1.5x the ~31 needed) by
# 0.8-1.5 points (docs/training.md), so more passes of the smaller model pay up to about 1.5x the need.
LADDER_EPOCHS = 1.5
FIXED_SCHEDULE_PRECISION = ("fp32: a fixed --epochs schedule, so the same seed gives the same numbers twice; "
                            "bf16 is planned against a --time-budget (or set --precision bf16)")
DEFAULT_BUDGET = 270.0  # seconds, when neither --epochs nor --time-budget is given (the demo's 4.5 minutes)


def _measure_precision(plan: "Plan", timer: "StepTimer", fields: dict, precisions: Tuple[str, ...]) \
        -> Tuple[str, Dict[str, float]]:
    """Time a step of `fields` in each candidate precision; record the times and why the fastest is picked (bf16
    still has to pass the caller's check). Returns (the fastest, seconds per step of each)."""
    times = {prec: timer(fields, prec) for prec in precisions}
    return _record_precision(plan, times), times


def _record_precision(plan: "Plan", times: Dict[str, float]) -> str:
    """Record the step time of each precision (of the model the plan trains) and why the fastest wins; returns it."""
    pick = min(times, key=times.get)
    plan.measurements["precision_seconds"] = {k: round(v, 4) for k, v in times.items()}
    shown = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in times.items())
    plan.reasons["precision"] = (f"{pick}: the only candidate on this hardware ({shown} per step)" if len(times) == 1
                                 else f"{pick}: the fastest measured ({shown} per step)")
    return pick


def epochs_needed(num_train: int) -> float:
    """How many passes over the training set a ViT needs: more for small data sets, which a ViT has to see many
    times (DeiT/CCT small-data recipes run 300+ epochs on 50k images; measured here at budgets of minutes to an
    hour, see the README). Augmentation grows from it; a bigger model needs LADDER_EPOCHS times it."""
    return float(min(150.0, max(15.0, 30.0 * (50_000 / max(1, num_train)) ** 0.35)))


@dataclass
class Plan:
    """What the planner chose (`recipe`: every field it set), why (`reasons`, one line per decision) and what it
    measured (`measurements`)."""

    recipe: Recipe
    reasons: Dict[str, str] = field(default_factory=dict)
    measurements: Dict[str, object] = field(default_factory=dict)

    def lines(self) -> List[str]:
        return [f"{k}: {v}" for k, v in self.reasons.items()]

    def note_flags(self, final: Recipe, sources: Dict[str, str]) -> None:
        """Each reason whose decision a flag overrode says so, with the value used; the plan's own words stay (what
        it would have chosen and why)."""
        for key, names in REASON_FIELDS.items():
            flagged = [n for n in names if sources.get(n) == "flag"]
            if key in self.reasons and flagged:
                self.reasons[key] += " — overridden by your flags: " + ", ".join(
                    f"{n} {_shown(getattr(final, n))}" for n in flagged)


# the recipe fields behind each reason the plan gives that a flag can override (the model and precision reasons
# already measure what the flags fixed)
REASON_FIELDS: Dict[str, Tuple[str, ...]] = {
    "compile": ("compile",),
    "optimiser": ("lr", "min_lr", "weight_decay", "warmup", "clip_grad", "ema_decay", "layer_decay", "drop_path_rate"),
    "augment": ("augment", "hflip", "label_smoothing", "mixup", "cutmix", "aug_ramp"),
    "evaluate": ("tta_flip", "tta_shift", "tta_zoom"),
}


def _shown(v) -> str:
    """A recipe value as a flag would take it: 1e-4, on/off, 1.1,1.2 ('none' for an empty list)."""
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (tuple, list)):
        return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) or "none"
    return f"{v:g}" if isinstance(v, float) else str(v)


def token_layout(side: int) -> Tuple[int, int, str]:
    """(img_size, patch_size, stem) for images of `side` pixels: about 8 tokens a side; a conv stem when the patch
    is a power of two (>= 2), else a patchify conv. 32 → (32, 4, conv); 28 → (28, 4, conv); 8 → (8, 2, conv)."""
    if side <= 8:
        return side, 2 if side % 2 == 0 else 1, "conv" if side % 2 == 0 else "patch"
    p = 2 ** max(1, round(math.log2(side / 8)))
    img = max(p, (side // p) * p)
    return img, p, "conv"


def resolution_for(profile: DataProfile, budget: Optional[float]) -> int:
    """The training side: the images' own (median shorter side) up to a cap that grows with the budget, since
    compute per image grows with its area: 64 px under 30 minutes, 128 px under 3 hours, 224 px beyond."""
    native = min(profile.native_size)
    cap = 224 if budget is None or budget >= 3 * 3600 else 128 if budget >= 1800 else 64
    return int(min(native, cap))


FULL_RES_CONV_MAX_SIDE = 32  # a full-resolution stem conv costs ~area: measured paying at 32 px, not above


def _full_res_conv(img: int, patch: int, stem: str) -> bool:
    """Whether the planned conv stem starts with a stride-1 conv at full resolution: small images only."""
    return stem == "conv" and img <= FULL_RES_CONV_MAX_SIDE and patch >= 2


def stem_channels_for(img: int, patch: int, stem: str, embed_dim: int) -> Tuple[int, ...]:
    """The conv stem's widths: timm's tiers (one stride-2 conv per halving, `()`), plus a leading stride-1 conv of
    half the first tier's width where the images are small (<= 32 px). 32 px, patch 4, width 128 → (32, 64, 128)."""
    if not _full_res_conv(img, patch, stem):
        return ()
    from ..models.vit import conv_stem_channels

    tiers = conv_stem_channels(patch, embed_dim)
    return (max(16, tiers[0] // 2), *tiers)


def _model_fields(rung: Tuple[int, int, int, float], img: int, patch: int, stem: str, in_chans: int,
                  stem_channels: Optional[Tuple[int, ...]] = None, user_arch: Optional[dict] = None) -> dict:
    """The model fields of a ladder rung with the user's architecture fields on top; `stem_channels` the user's
    (None: planned for the final width)."""
    d, depth, heads, mlp = rung
    out = {**dict(img_size=img, patch_size=patch, in_chans=in_chans, embed_dim=d, depth=depth, num_heads=heads,
                  mlp_ratio=mlp, stem=stem, global_pool="avg", class_token=False), **(user_arch or {})}
    out["stem_channels"] = (stem_channels_for(img, patch, stem, out["embed_dim"]) if stem_channels is None
                            else tuple(stem_channels))
    return out


def augmentation_for(epochs: float, profile: DataProfile) -> Dict[str, object]:
    """Augmentation strength for the number of passes the run will make: crops (and flips for mirror-symmetric
    data) below the data's epoch need; batch RandAugment from ~1x it; MixUp/CutMix and erasing from ~3x, ramped in
    over the first half of the schedule."""
    need = epochs_needed(profile.num_train)
    out: Dict[str, object] = {"hflip": profile.mirror_symmetric, "label_smoothing": 0.1}
    if epochs < need:
        out.update(augment="light", mixup=0.0, cutmix=0.0, aug_ramp=False)
    elif epochs < 3 * need:
        out.update(augment="default", mixup=0.0, cutmix=0.0, aug_ramp=True)
    else:
        out.update(augment="strong", mixup=0.8, cutmix=1.0, aug_ramp=True)
    return out


StepTimer = Callable[[dict, str], float]  # (model fields, precision) → seconds per training step
# torch.compile is measured only where the budget can pay for compiling (~1 min on 2 cores) and gain from it
COMPILE_MIN_BUDGET = 1800.0


def _plan_compile(plan, r, compile_timer, fields, prec, sec, left, batch, num_train, epochs) -> float:
    """Measure the chosen model compiled (the compile time included); keep it if it buys more epochs."""
    compiled, compile_secs = compile_timer(fields, prec)
    gain = sec / max(compiled, 1e-9)
    with_compile = _epochs_in(left - compile_secs, compiled, batch, num_train)
    plan.measurements["compile"] = {"eager_step_s": round(sec, 4), "compiled_step_s": round(compiled, 4),
                                    "compile_s": round(compile_secs, 1)}
    r["compile"] = with_compile > epochs * 1.05
    plan.reasons["compile"] = (f"torch.compile: {gain:.2f}x the eager step, {compile_secs:.0f} s to compile: "
                               + ("pays off" if r["compile"] else "not worth it here") +
                               f" ({with_compile:.1f} vs {epochs:.1f} epochs)")
    return with_compile if r["compile"] else epochs


def plan_recipe(profile: DataProfile, user: Recipe, *, budget: Optional[float], spent: float = 0.0,
                timer: Optional[StepTimer] = None, precisions: Tuple[str, ...] = ("fp32",),
                init: Optional[dict] = None, held_out_is_test: bool = False,
                fixed_fields: Optional[dict] = None,
                compile_timer: Optional[Callable[[dict, str], Tuple[float, float]]] = None) -> Plan:
    """Choose every recipe field the user left open. `budget`: seconds for the whole command (None: the user gave
    --epochs); `spent`: seconds already used; `timer`: measures a training step of a candidate (model fields,
    precision) → seconds; `precisions`: the candidates (the caller checks that bf16 trains as well before using
    it); `init`: a pretrained model's config dict (fine-tuning); `fixed_fields`: the model fields of an
    architecture the user fixed (a named model), to measure precisions on; `compile_timer`: (model fields,
    precision) → (seconds per compiled step, seconds to compile)."""
    plan = Plan(Recipe())
    r: Dict[str, object] = {}
    why = plan.reasons
    batch = user.batch_size or _batch_for(profile.num_train)
    r["batch_size"] = batch
    if init is not None:
        return _plan_fine_tune(profile, user, plan, budget, spent, timer, precisions, init, batch)
    if user.model is not None:  # a named model brings its layout: only the rest is planned
        return _plan_fixed(profile, user, plan, r, budget, spent, timer, precisions, held_out_is_test, fixed_fields,
                           batch)
    # resolution and tokens
    side = user.img_size or resolution_for(profile, budget)
    img, patch, stem = token_layout(side)
    if user.patch_size:
        patch = user.patch_size
        stem = "conv" if patch >= 2 and (patch & (patch - 1)) == 0 else "patch"
        img = (side // patch) * patch
    stem = user.stem or stem
    in_chans = user.in_chans or profile.in_chans
    r.update(img_size=img, patch_size=patch, stem=stem, in_chans=in_chans, global_pool="avg", class_token=False)
    grid = img // patch
    why["input"] = (f"{img}x{img} px ({'native size' if img >= min(profile.native_size) - patch else 'budget cap'})"
                    f", {'grey (1 channel)' if in_chans == 1 else 'colour'}, {grid}x{grid} tokens through a "
                    f"{'convolutional stem (stride-2 3x3 convs)' if stem == 'conv' else 'patchify conv'} of "
                    f"patch {patch}"
                    + (", after a full-resolution 3x3 conv (small images)"
                       if user.stem_channels is None and _full_res_conv(img, patch, stem) else ""))
    need = epochs_needed(profile.num_train)
    grow = LADDER_EPOCHS * need  # a bigger rung only where it still gets this many passes
    fixed_arch = user.model is not None
    # the model rung and precision: measured, unless the schedule is in epochs (then by data size alone, in fp32)
    options = []  # (rung index, its fastest precision, its seconds per step, seconds per step of each precision)
    user_arch = {k: v for k, v in user.set_fields().items() if k in ("embed_dim", "depth", "num_heads",
                                                                      "mlp_ratio", "global_pool", "class_token")}
    user_sized = user_arch.keys() >= {"embed_dim", "depth"}  # the user fixed the size: one candidate, nothing chosen
    if budget is not None and timer is not None and not fixed_arch:
        left = budget - spent
        # which precision is faster can change with the width (bf16 pays on large matmuls, its casts cost on small
        # ones): with an hour-scale budget every rung is timed in each (seconds of planning); else in the first's
        every_rung = left >= COMPILE_MIN_BUDGET
        prec_pick, labels = None, {}
        for i, rung in enumerate(LADDER):
            fields = _model_fields(rung, img, patch, stem, in_chans, user.stem_channels, user_arch)
            if prec_pick is None:
                prec_pick, times = _measure_precision(plan, timer, fields, precisions)
            else:
                times = {p: timer(fields, p) for p in (precisions if every_rung else (prec_pick,))}
            fastest = min(times, key=times.get)
            t = times[fastest]
            options.append((i, fastest, t, times))
            labels[i] = f"{fields['embed_dim']}x{fields['depth']}"  # the rung's, or the user's size
            epochs = _epochs_in(left, t, batch, profile.num_train)
            if epochs < grow / 2 or user_sized:
                break  # bigger rungs only get slower (or the user fixed the size): stop measuring
        fits = [o for o in options if _epochs_in(left, o[2], batch, profile.num_train) >= grow]
        pick = max(fits, key=lambda o: o[0]) if fits else options[0]
        i, prec, sec, times = pick
        if len(times) > 1:  # the precision verdict (and the bf16 check's cost) is the chosen rung's
            _record_precision(plan, times)
        epochs = _epochs_in(left, sec, batch, profile.num_train)
        plan.measurements["step_seconds"] = {f"{labels[o[0]]}/{o[1]}": round(o[2], 4) for o in options}
        r.update(_model_fields(LADDER[i], img, patch, stem, in_chans, user.stem_channels, user_arch))
        size = f"width {r['embed_dim']}, depth {r['depth']}, {r['num_heads']} heads"
        if user_sized:  # say what the user's model buys
            why["model"] = (f"{size} (your flags): {epochs:.0f} epochs of {profile.num_train:,} images in the budget "
                            f"at {batch / sec:.0f} img/s, against the ~{need:.0f} this data needs")
        else:
            why["model"] = (f"{size}: the largest of the {len(options)} measured that gets >= {grow:.0f} epochs of "
                            f"{profile.num_train:,} images in the budget ({epochs:.0f} at {batch / sec:.0f} img/s; "
                            f"{LADDER_EPOCHS:g}x the ~{need:.0f} this data needs)"
                            if fits else f"{size}: the smallest; it gets {epochs:.1f} epochs"
                            + (f", under the ~{need:.0f} this data needs (a longer --time-budget would pay)"
                               if epochs < need else f" (a bigger model would need >= {grow:.0f})"))
        r["precision"] = prec
        plan.measurements["planned_epochs"] = round(epochs, 1)
        if compile_timer is not None and user.compile is None and left >= COMPILE_MIN_BUDGET:
            epochs = _plan_compile(plan, r, compile_timer, _model_fields(LADDER[i], img, patch, stem, in_chans,
                                                                         user.stem_channels, user_arch),
                                   prec, sec, left, batch, profile.num_train, epochs)
    else:
        i = _rung_for_data(profile.num_train)
        fields = fixed_fields if fixed_arch else _model_fields(LADDER[i], img, patch, stem, in_chans,
                                                               user.stem_channels, user_arch)
        if not fixed_arch:
            r.update(_model_fields(LADDER[i], img, patch, stem, in_chans, user.stem_channels, user_arch))
            why["model"] = (f"width {LADDER[i][0]}, depth {LADDER[i][1]}: sized for {profile.num_train:,} "
                            "training images (no time budget to measure against)")
        r["precision"] = "fp32"
        if budget is None:
            why["precision"] = FIXED_SCHEDULE_PRECISION
        elif timer is not None and fields:
            r["precision"], times = _measure_precision(plan, timer, fields, precisions)
            plan.measurements["planned_epochs"] = round(
                _epochs_in(budget - spent, times[r["precision"]], batch, profile.num_train), 1)
        epochs = float(user.epochs) if user.epochs else float(plan.measurements.get("planned_epochs", need))
    r["epochs"] = user.epochs
    return _plan_training(profile, plan, r, epochs, batch, held_out_is_test, user.augment)


def _plan_fixed(profile, user, plan, r, budget, spent, timer, precisions, held_out_is_test, fixed_fields, batch):
    """A named model: precision measured on it, epochs from the budget, then the rest of the training plan."""
    r["precision"] = "fp32"
    epochs = float(user.epochs) if user.epochs else epochs_needed(profile.num_train)
    if budget is None:
        plan.reasons["precision"] = FIXED_SCHEDULE_PRECISION
    elif timer is not None and fixed_fields:
        r["precision"], times = _measure_precision(plan, timer, fixed_fields, precisions)
        epochs = _epochs_in(budget - spent, times[r["precision"]], batch, profile.num_train)
        plan.measurements["planned_epochs"] = round(epochs, 1)
    plan.reasons["model"] = f"{user.model} (your choice)"
    r["epochs"] = user.epochs
    return _plan_training(profile, plan, r, epochs, batch, held_out_is_test, user.augment)


TTA_ZOOM = (1.1, 1.2)  # the planned test-time zooms: the image's centre enlarged by 10% and 20%


def tta_zoom_for(augment: Optional[str]) -> Tuple[float, ...]:
    """Test-time views besides the image (and its mirror image): its centre enlarged 1.1x and 1.2x (multi-scale
    testing, like the classic centre crops). On held-out CIFAR-10 they beat flips alone by 1.2-2.0 points on four
    models, and flips + 2-px shifts by 0.9-1.5 (docs/training.md); none when training does not augment at all."""
    return () if augment == "none" else TTA_ZOOM


def _views(flip: bool, shift: int, zoom: Tuple[float, ...] = ()) -> str:
    """The test-time views in words, for the plan's reasons."""
    parts = (["its mirror image"] if flip else []) + \
        ([f"its centre enlarged {', '.join(f'{z:g}x' for z in zoom)}"] if zoom else []) + \
        ([f"{shift}-px shifts each way"] if shift else [])
    return f"averaged over the image, {' and '.join(parts)} ({tta_view_count(flip, shift, zoom)} views) " \
        if parts else ""


def _plan_training(profile, plan, r, epochs, batch, held_out_is_test, augment_flag: Optional[str] = None) -> Plan:
    """Optimiser, augmentation, regularisation and evaluation for a run of `epochs` passes. `augment_flag`: the
    user's --augment (it decides whether there are zoomed test-time views)."""
    why = plan.reasons
    need = epochs_needed(profile.num_train)
    r.update(lr=2e-3 * math.sqrt(batch / 128), min_lr=1e-5, weight_decay=0.05, warmup=0.05, clip_grad=1.0)
    steps = max(1.0, epochs * profile.num_train / batch)
    r["ema_decay"] = float(min(0.9999, max(0.99, 1 - 1 / (0.05 * steps))))
    why["optimiser"] = (f"AdamW lr {r['lr']:.1e} (batch {batch}), weight decay 0.05, warm-up 5% then cosine; "
                        f"EMA {r['ema_decay']:.4f} (~5% of the ~{steps:,.0f} steps)")
    aug = augmentation_for(epochs, profile)
    r.update(aug)
    r["drop_path_rate"] = 0.1 if epochs >= 3 * need else 0.0
    r["patch_drop_rate"] = 0.0
    r["progressive"] = 1.0
    r["tta_flip"] = bool(profile.mirror_symmetric)
    r["tta_shift"], r["tta_zoom"] = 0, tta_zoom_for(augment_flag or aug["augment"])
    why["augment"] = (f"{aug['augment']} ({epochs:.0f} epochs vs ~{need:.0f} needed)"
                      f"{', flips' if aug['hflip'] else ', no flips (the class means are not mirror-symmetric)'}"
                      f"{', MixUp/CutMix' if aug['mixup'] else ''}; label smoothing 0.1")
    why["evaluate"] = _views(r["tta_flip"], r["tta_shift"], r["tta_zoom"]) + \
        ("on the held-out test split, which never chooses the checkpoint" if held_out_is_test else
         "on the validation split, which chooses the best checkpoint")
    plan.recipe = Recipe(**{k: v for k, v in r.items() if k in Recipe.__dataclass_fields__})
    return plan


def _plan_fine_tune(profile, user, plan, budget, spent, timer, precisions, init, batch) -> Plan:
    """Fine-tuning a pretrained model: its architecture; its resolution unless the images are smaller or the
    budget cannot afford it; a low learning rate with layer-wise decay, short warm-up, light regularisation."""
    why, r = plan.reasons, {"batch_size": batch}
    patch = int(init["patch_size"])
    pre = init["img_size"] if isinstance(init["img_size"], int) else min(init["img_size"])
    native = min(profile.native_size)
    side = user.img_size or max(patch * 4, min(pre, (max(native, patch * 4) // patch) * patch))
    prec, epochs = "fp32", float(user.epochs or 10)
    if budget is None:
        why["precision"] = FIXED_SCHEDULE_PRECISION
    elif timer is not None:
        fields = {"img_size": side}
        best = min(((p, timer(fields, p)) for p in precisions), key=lambda x: x[1])
        prec = best[0]
        epochs = _epochs_in(budget - spent, best[1], batch, profile.num_train)
        while epochs < 3 and side > patch * 4 and user.img_size is None:  # too slow: a lower resolution
            side = max(patch * 4, (int(side * 0.75) // patch) * patch)
            best = min(((p, timer({"img_size": side}, p)) for p in precisions), key=lambda x: x[1])
            prec, epochs = best[0], _epochs_in(budget - spent, best[1], batch, profile.num_train)
        plan.measurements["planned_epochs"] = round(epochs, 1)
        why["precision"] = (f"{prec}: the fastest of {', '.join(precisions)} measured at {side} px"
                            if len(precisions) > 1 else f"{prec}: the only candidate on this hardware")
    r.update(img_size=side, precision=prec, epochs=user.epochs)
    why["input"] = f"{side}x{side} px (pretrained at {pre}; the images' median side is {native})"
    depth = int(init.get("depth", 12))
    r.update(lr=5e-4 * batch / 512, min_lr=1e-6, weight_decay=0.05, layer_decay=0.75 if depth >= 6 else 0.85,
             warmup=0.1 if epochs < 10 else 1.0, clip_grad=1.0, drop_path_rate=0.1, patch_drop_rate=0.0,
             progressive=1.0, ema_decay=0.0, label_smoothing=0.1, mixup=0.0, cutmix=0.0, aug_ramp=False,
             augment="light" if epochs < 10 else "default", hflip=profile.mirror_symmetric,
             tta_flip=bool(profile.mirror_symmetric))
    r["tta_shift"], r["tta_zoom"] = 0, tta_zoom_for(user.augment or r["augment"])
    why["evaluate"] = _views(r["tta_flip"], r["tta_shift"], r["tta_zoom"]).strip() or "the image alone"
    why["optimiser"] = (f"fine-tuning: AdamW lr {r['lr']:.1e} with layer decay {r['layer_decay']}, warm-up "
                        f"{'10% of steps' if epochs < 10 else '1 epoch'}, drop path 0.1, no MixUp")
    why["augment"] = f"{r['augment']}{', flips' if r['hflip'] else ', no flips'} ({epochs:.0f} epochs)"
    plan.recipe = Recipe(**{k: v for k, v in r.items() if k in Recipe.__dataclass_fields__})
    return plan


def _batch_for(num_train: int) -> int:
    """128, or smaller for small data sets so that an epoch still has ~50 steps."""
    b = 128
    while b > 16 and num_train / b < 50:
        b //= 2
    return b


def _rung_for_data(num_train: int) -> int:
    """Without a budget: a rung by data size (about one rung per 4x more images, from 1,000)."""
    return int(min(len(LADDER) - 3, max(0, round(math.log(max(1, num_train) / 1000, 4)))))


def _epochs_in(seconds: float, sec_per_step: float, batch: int, num_train: int) -> float:
    """Epochs that `seconds` buys at `sec_per_step`, after ~8% for evaluation, checkpoints and the final report."""
    return max(0.0, seconds * 0.92) / max(sec_per_step, 1e-9) * batch / max(1, num_train)
