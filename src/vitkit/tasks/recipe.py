"""A classifier's training recipe as typed data, and the one rule that decides each choice: flag, else plan, else
default.

    user = Recipe(lr=1e-3)                      # what the user fixed (CLI flags or Python), None = not fixed
    plan = Recipe(embed_dim=192, depth=6, ...)  # what the planner derived from the data and the clock
    final, sources = resolve(user, plan)        # every field set; sources[name] = 'flag' | 'plan' | 'default'

Every field a planner may choose is here, so a rerun from a run's `config.json` repeats the run exactly
(`Recipe.from_dict(saved["recipe"]["values"])`), and every one can be overridden by a flag of the same name.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Dict, Mapping, Optional, Sequence, Tuple

from ..errors import ConfigError

# Model fields the recipe carries (ViTConfig names) and what they default to when neither flag nor plan sets them.
MODEL_FIELDS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "stem",
                "stem_channels", "global_pool", "class_token", "drop_path_rate", "patch_drop_rate")


@dataclass(frozen=True)
class Recipe:
    """Every choice that shapes a classifier run's result. None means 'not chosen here'."""

    # the model: a registered name as the base, and/or explicit architecture fields (ViTConfig names)
    model: Optional[str] = None
    img_size: Optional[int] = None  # the final training (and evaluation) resolution
    patch_size: Optional[int] = None
    in_chans: Optional[int] = None
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    stem: Optional[str] = None  # 'patch' | 'conv'
    stem_channels: Optional[Tuple[int, ...]] = None  # conv stem widths; () = timm's tiers (ViTConfig.stem_channels)
    global_pool: Optional[str] = None
    class_token: Optional[bool] = None
    drop_path_rate: Optional[float] = None
    patch_drop_rate: Optional[float] = None
    # the schedule and the optimiser
    epochs: Optional[int] = None
    time_budget: Optional[float] = None  # seconds of wall-clock for the whole command
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    min_lr: Optional[float] = None
    weight_decay: Optional[float] = None
    warmup: Optional[float] = None
    clip_grad: Optional[float] = None
    ema_decay: Optional[float] = None
    layer_decay: Optional[float] = None
    precision: Optional[str] = None  # fp32 | bf16 | fp16 ('auto' as a flag: the planner measures)
    compile: Optional[bool] = None
    # data and regularisation
    augment: Optional[str] = None  # none | light | default | strong
    hflip: Optional[bool] = None
    label_smoothing: Optional[float] = None
    mixup: Optional[float] = None
    cutmix: Optional[float] = None
    aug_ramp: Optional[bool] = None  # batch-level augmentation strength grows over the schedule
    progressive: Optional[float] = None  # start at this fraction of img_size, reach it for the last part; 1 = off
    tta_flip: Optional[bool] = None  # average the logits of the image and its mirror image at evaluation
    tta_shift: Optional[int] = None  # ... and of the image shifted this many pixels each way (0 = off)
    tta_zoom: Optional[Tuple[float, ...]] = None  # ... and of its centre enlarged by each factor (() = off)

    def __post_init__(self) -> None:
        """Every set field checked on its own (type and range): a one-line ConfigError naming it."""
        from .. import validate as v
        from ..models.config import ViTConfig

        if isinstance(self.stem_channels, list):  # from JSON (config.json, --recipe): the tuple it was
            object.__setattr__(self, "stem_channels", tuple(self.stem_channels))
        if self.tta_zoom is not None:
            object.__setattr__(self, "tta_zoom", zoom_factors(self.tta_zoom))
        if self.model is not None and not isinstance(self.model, str):
            raise ConfigError(f"model must be a registered model name, got {self.model!r}", field="model")
        ViTConfig.check_fields({k: getattr(self, k) for k in MODEL_FIELDS if getattr(self, k) is not None})
        v.integer(self.epochs, "epochs", lo=1, optional=True)
        v.number(self.time_budget, "time_budget", lo=0, lo_open=True, optional=True)
        v.integer(self.batch_size, "batch_size", lo=1, optional=True)
        v.number(self.lr, "lr", lo=0, lo_open=True, optional=True)
        for k in ("min_lr", "weight_decay", "warmup", "clip_grad", "mixup", "cutmix"):
            v.number(getattr(self, k), k, lo=0, optional=True)
        v.number(self.ema_decay, "ema_decay", lo=0, hi=1, hi_open=True, optional=True)
        v.number(self.layer_decay, "layer_decay", lo=0, hi=1, lo_open=True, optional=True)
        v.number(self.label_smoothing, "label_smoothing", lo=0, hi=1, hi_open=True, optional=True)
        v.number(self.progressive, "progressive", lo=0, hi=1, lo_open=True, optional=True)
        v.integer(self.tta_shift, "tta_shift", lo=0, optional=True)
        v.choice(self.precision, "precision", ("fp32", "bf16", "fp16"), optional=True)
        v.choice(self.augment, "augment", ("none", "light", "default", "strong"), optional=True)
        for k in ("compile", "hflip", "aug_ramp", "tta_flip"):
            v.flag(getattr(self, k), k, optional=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown recipe field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def set_fields(self) -> Dict[str, object]:
        """The fields that are chosen (not None)."""
        return {k: v for k, v in self.to_dict().items() if v is not None}

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)


def zoom_factors(value, field: str = "tta_zoom") -> Tuple[float, ...]:
    """`value` (a list or tuple of factors, each in (1, 2]) as a tuple; a one-line ConfigError otherwise."""
    if isinstance(value, (list, tuple)) and all(isinstance(z, (int, float)) and not isinstance(z, bool)
                                                and 1.0 < z <= 2.0 for z in value):
        return tuple(float(z) for z in value)
    raise ConfigError(f"{field} must be a list of zoom factors above 1 and at most 2 (e.g. 1.1,1.2), got {value!r}",
                      field=field)


def tta_view_count(tta_flip: bool = False, tta_shift: int = 0, tta_zoom: Sequence[float] = ()) -> int:
    """How many forward passes a classifier's test-time views make per image (`classify_logits`)."""
    return (1 + len(tta_zoom) + (4 if tta_shift else 0)) * (2 if tta_flip else 1)


# What a field is when neither a flag nor the plan chose it (the planner normally chooses all of them).
DEFAULTS = Recipe(
    img_size=None, patch_size=None, in_chans=None, embed_dim=None, depth=None, num_heads=None, mlp_ratio=None,
    stem="patch", stem_channels=(), global_pool=None, class_token=None, drop_path_rate=0.0, patch_drop_rate=0.0,
    epochs=None, time_budget=None, batch_size=128, lr=1e-3, min_lr=1e-5, weight_decay=0.05, warmup=0.05,
    clip_grad=1.0, ema_decay=0.0, layer_decay=None, precision="fp32", compile=False,
    augment="default", hflip=None, label_smoothing=0.1, mixup=0.0, cutmix=0.0, aug_ramp=False, progressive=1.0,
    tta_flip=False, tta_shift=0, tta_zoom=(),
)


def resolve(user: Recipe, plan: Optional[Recipe] = None, defaults: Recipe = DEFAULTS) -> Tuple[Recipe, Dict[str, str]]:
    """Each field: the user's value if set, else the plan's, else the default. Returns the merged recipe and, per
    field that ends up set, where it came from ('flag', 'plan' or 'default')."""
    plan = plan or Recipe()
    out, sources = {}, {}
    for f in fields(Recipe):
        for where, r in (("flag", user), ("plan", plan), ("default", defaults)):
            v = getattr(r, f.name)
            if v is not None:
                out[f.name], sources[f.name] = v, where
                break
        else:
            out[f.name] = None
    return Recipe(**out), sources


def saved_recipe(run) -> Dict[str, object]:
    """The resolved recipe a run recorded (its folder or config.json), as its set fields: the base of a rerun."""
    from ..train import read_config

    saved = read_config(run, doing="--recipe").get("recipe", {})
    saved = saved.get("values") if isinstance(saved, dict) else None
    if not isinstance(saved, dict) or not saved:
        raise ConfigError(f"--recipe {str(run)!r} holds no resolved recipe (a run from an older vitkit?)")
    return {k: v for k, v in saved.items() if v is not None}


# --model-arg keys that are the recipe's architecture choices (the planner's to make unless the user made them)
ARCH_ARGS = ("img_size", "num_heads", "patch_size", "embed_dim", "depth", "stem", "stem_channels", "in_chans",
             "mlp_ratio")


def recipe_from_flags(flags: Mapping, recipe=None, model_args: Optional[Mapping] = None) -> Recipe:
    """The user's recipe, field by field: the flag, else the saved run's (`recipe`: its folder or config.json), else
    None for the planner. `flags` holds Recipe fields (None = not given; time_budget as '10m' or 'none', precision
    'auto' = the planner's); an architecture `model_args` entry counts as its field's flag when that flag is unset."""
    from ..train import parse_budget

    base = saved_recipe(recipe) if recipe else {}  # a rerun of a run's resolved recipe; flags override
    flags = dict(flags)
    budget = flags.get("time_budget")
    flags.update(time_budget=parse_budget(budget), precision=None if flags.get("precision") == "auto" else
                 flags.get("precision"))
    if budget is not None and flags["time_budget"] is None or flags.get("epochs") is not None and budget is None:
        base.pop("time_budget", None)  # 'none', or an epoch count, replaces the saved run's budget
    for k, v in dict(model_args or {}).items():  # an architecture --model-arg is the recipe's choice too
        if k in ARCH_ARGS:
            flags[k] = v if flags.get(k) is None else flags[k]
    return Recipe.from_dict({**base, **{k: v for k, v in flags.items() if v is not None}})
