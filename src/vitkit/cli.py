"""The `vitkit` command. Each subcommand parses its flags, makes one call into the library and prints the result.

Errors that vitkit raises on purpose (`vitkit.errors`) and OSErrors (paths) print as one line (`vitkit: error: ...`)
with exit code 2; `--debug` shows the traceback instead. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Callable, Dict, List, Optional

from .errors import ConfigError, VitkitError
from .train import RESUMABLE, TrainConfig, elastic_resume, refuse_on_resume, train_config_from_flags

# subcommand name → (add_arguments(parser), run(args) -> exit code). Filled in below, one block per subcommand.
COMMANDS: Dict[str, tuple] = {}


def command(name: str, help: str):
    """Register a subcommand: decorate its `run(args)`; `run.add_arguments(parser)` declares its flags."""

    def wrap(run: Callable):
        COMMANDS[name] = (help, run)
        return run

    return wrap


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _is_rank0() -> bool:
    """Whether this is the process that prints: rank 0 of a torchrun group, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def _report_run(args, summary: dict, outcome) -> None:
    """A training command's last words, from the rank-0 process only: the summary as JSON with --json, else one
    line: run folder, epochs, steps, time, then `outcome()` (what the run achieved, command-specific)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if args.json:
        _print_json(summary)
    else:
        print(f"run {summary['run_dir']}: {summary['epochs']} epochs, {summary['steps']} steps in "
              f"{summary['train_seconds']:.0f} s; {outcome()}")


# ---- vitkit models -------------------------------------------------------------------------------------------
@command("models", "list the named model configs with parameters and GFLOPs")
def cmd_models(args) -> int:
    from .models import model_table

    rows = model_table(args.filter)
    if args.json:
        _print_json(rows)
        return 0
    print(f"{'name':<26}{'img':>5}{'patch':>6}{'dim':>6}{'depth':>6}{'heads':>6}{'params(M)':>11}{'GFLOPs':>9}")
    for r in rows:
        print(f"{r['name']:<26}{r['img_size']:>5}{r['patch']:>6}{r['dim']:>6}{r['depth']:>6}{r['heads']:>6}"
              f"{r['params_M']:>11.2f}{r['GFLOPs']:>9.2f}")
    return 0


cmd_models.add_arguments = lambda p: (
    p.add_argument("filter", nargs="?", help="substring or glob, e.g. 'base' or 'vit_*_patch16_224'"),
    p.add_argument("--json", action="store_true", help="print JSON"),
)


# ---- vitkit summary ------------------------------------------------------------------------------------------
@command("summary", "build a model and print its structure, size and cost")
def cmd_summary(args) -> int:
    from .models import summarize

    model, info = summarize(args.model, img_size=args.img_size, num_classes=args.num_classes)
    if args.json:
        _print_json(info)
    else:
        print(model)
        for k, v in info.items():
            print(f"{k:>8}: {v}")
    return 0


cmd_summary.add_arguments = lambda p: (
    p.add_argument("model", help="a registered model name (see `vitkit models`)"),
    p.add_argument("--img-size", type=int, default=None),
    p.add_argument("--num-classes", type=int, default=None),
    p.add_argument("--json", action="store_true"),
)


# ---- vitkit train | eval | predict ---------------------------------------------------------------------------
def _run_name(text: str) -> str:
    """--name: a plain folder name (the run folder is RUNS_DIR/NAME)."""
    if not text.strip() or "/" in text or "\\" in text or text in (".", "..") or len(text.encode()) > 255:
        raise argparse.ArgumentTypeError(f"expected a plain folder name (not empty, no '/', at most 255 bytes), got "
                                         f"{text[:40]!r}{'...' if len(text) > 40 else ''}")
    return text


def _kv(text: str):
    """KEY=VALUE with VALUE read as JSON when it parses (numbers, true/false, lists), else as a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        return k.strip(), json.loads(v)
    except ValueError:
        return k.strip(), v


def _widths(text: str):
    """W,W,... → a tuple of positive ints ('' → (): the default widths)."""
    try:
        out = tuple(int(w) for w in text.replace(" ", "").split(",") if w)
    except ValueError:
        out = None
    if out is None or any(w < 1 for w in out):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive widths such as 32,64,128, got {text!r}")
    return out


def _zooms(text: str):
    """Z,Z,... → a tuple of zoom factors in (1, 2] ('' → (): none)."""
    from .tasks.recipe import zoom_factors

    try:
        return zoom_factors(tuple(float(z) for z in text.replace(" ", "").split(",") if z))
    except (ValueError, ConfigError):
        raise argparse.ArgumentTypeError(f"expected comma-separated zoom factors above 1 and at most 2 such as "
                                         f"1.1,1.2, got {text!r}") from None


# ---- the engine's flags, shared by train, pretrain and train-gen ---------------------------------------------
_RESUME_HELP = ("continue a run from its last checkpoint, with the options it was started with; only --epochs, "
                "--time-budget, --max-steps, --eval-every, --workers and --device may be given (a finished run "
                "trains on with a larger --epochs or --time-budget: the cosine is laid over the new total from "
                "the current step); each resume is recorded in config.json's history")

# TrainConfig field → its flag's argparse options ("flag": a name other than --field-name); fields not here
# (betas, best_metric, best_mode) have no flag. Every training command gets all of them (_add_engine_args).
_ENGINE_FLAGS: Dict[str, dict] = {
    "name": dict(type=_run_name, help="run name: outputs go to RUNS_DIR/NAME (default: after the dataset)"),
    "runs_dir": dict(help="the folder of run folders (default: runs)"),
    "overwrite": dict(action="store_true",
                      help="replace an existing run folder of the same name (never one a running process owns)"),
    "resume": dict(metavar="RUN_DIR", help=_RESUME_HELP),
    "epochs": dict(type=int, help="train this many epochs (with --resume: a new length for the run)"),
    "time_budget": dict(metavar="DURATION", help="lay the schedule over this wall-clock time (10m; 'none' for "
                        "epochs; with --resume: the run's new total, time already used included)"),
    "max_steps": dict(type=int, help="stop after this many steps (a quick look; schedule unchanged)"),
    "batch_size": dict(type=int, help="global batch per step (split over processes)"),
    "accum_steps": dict(type=int, help="gradient accumulation: optimizer step every N batches"),
    "lr": dict(type=float),
    "min_lr": dict(type=float),
    "weight_decay": dict(type=float),
    "warmup": dict(type=float, help="warm-up: fraction of steps (<1) or epochs (>=1)"),
    "clip_grad": dict(type=float, help="max gradient norm (0 = off)"),
    "precision": dict(choices=["auto", "fp32", "bf16", "fp16"], help="auto (default): the recipe's"),
    "ema_decay": dict(flag="--ema", type=float, metavar="DECAY", help="EMA of weights, e.g. 0.999"),
    "layer_decay": dict(type=float, help="layer-wise lr decay for fine-tuning, e.g. 0.75"),
    "compile": dict(action=argparse.BooleanOptionalAction, help="torch.compile the model"),
    "strategy": dict(choices=["ddp", "fsdp"], help="several processes (torchrun): ddp (default) keeps a full copy "
                     "of the model in each; fsdp shards weights, gradients and optimizer state (FSDP2, per block) "
                     "and checkpoints with torch.distributed.checkpoint"),
    "seed": dict(type=int),
    "eval_every": dict(type=int, help="evaluate every N epochs and at the end (default: every epoch, or under "
                       "--time-budget as often as keeps evaluation near 3%% of the training time)"),
    "save_every": dict(type=int, metavar="STEPS", help="also checkpoint every STEPS steps inside an epoch; a resume "
                       "goes on from the same batch of the epoch (for long epochs, e.g. streamed shards)"),
    "device": dict(help="auto | cpu | cuda | cuda:N | mps"),
    "workers": dict(type=int, help="DataLoader workers for image folders and shards"),
    "streams": dict(type=int, metavar="N", help="shards (wds:): the global batch takes an equal part from each of N "
                    "streams of shards, so any process count that divides N trains on the same batches and can "
                    "resume the run (default: processes x workers of the first launch)"),
    "quiet": dict(action="store_true", help="no progress bar; log lines only"),
}


def _add_engine_args(p, **help_: str) -> None:
    """One flag per TrainConfig field in _ENGINE_FLAGS, in the field order; `help_` rewords a field's help."""
    for f in dataclasses.fields(TrainConfig):
        if f.name in _ENGINE_FLAGS:
            kw = {"default": None, **_ENGINE_FLAGS[f.name]}
            if kw.get("action") == "store_true":
                kw["default"] = False
            kw["help"] = help_.get(f.name, kw.get("help"))
            p.add_argument(kw.pop("flag", "--" + f.name.replace("_", "-")), dest=f.name, **kw)


@command("train", "train a ViT classifier on a dataset (run folder: runs/<name>/)")
def cmd_train(args) -> int:
    from .tasks.classify import ClassifierConfig, train_classifier
    from .tasks.recipe import Recipe, recipe_from_flags

    if args.val_split is not None and not str(args.data).startswith("folder:"):
        raise ConfigError(f"val_split applies to folder:PATH data only; {args.data} has a fixed held-out split",
                          field="val_split")
    recipe = recipe_from_flags({f: getattr(args, f, None) for f in Recipe.__dataclass_fields__}, args.recipe,
                               dict(args.model_arg or []))
    task = ClassifierConfig(data=args.data, model=args.model, model_args=dict(args.model_arg or []), init=args.init,
                            init_format=args.init_format, data_dir=args.data_dir, download=args.download,
                            val_split=args.val_split, strict=args.strict, max_train=args.max_train,
                            max_val=args.max_val)
    name = _data_name(args.data)
    tc = train_config_from_flags(vars(args), {}, name, skip=Recipe.__dataclass_fields__)  # the planner's to choose
    tc = elastic_resume(tc)  # torchrun restarted this command: continue the run its first attempt began
    if args.quiet:  # no progress bar: the plan and one log line per epoch instead
        for logger in ("vitkit.train", "vitkit.tasks.classify"):
            logging.getLogger(logger).setLevel(logging.INFO)
    summary = train_classifier(task, tc, recipe=recipe, started=_STARTED)

    def outcome() -> str:
        ev = summary.get("eval", {})
        which = "final" if summary["best_epoch"] == summary["epochs"] else f"best (epoch {summary['best_epoch']})"
        return (f"{which} checkpoint: top-1 {ev.get('top1', float('nan')):.2f}%, "
                f"top-5 {ev.get('top5', float('nan')):.2f}% on {ev.get('num_images')} held-out images")

    _report_run(args, summary, outcome)
    return 0


def _data_name(spec: str) -> str:
    """A run name after a data spec: the folder's name for folder:PATH and wds:DIR (the shards' folder for a
    pattern or a list), else the spec itself (mnist5k, cifar10, ...)."""
    from pathlib import Path

    if spec.startswith("folder:"):
        return Path(spec[len("folder:"):]).name
    if spec.startswith("wds:"):
        p = Path(spec[len("wds:"):].split(",")[0])
        return (p.name if "{" not in p.name and not p.name.endswith(".tar") else p.parent.name) or "shards"
    return spec


def _fast(args) -> bool:
    """--fast, or a --precision (which only the fast path has)."""
    return bool(getattr(args, "fast", False) or getattr(args, "precision", None))


_STARTED = None  # the command's start on Trainer's clock (set in main): a time budget covers the whole command


def _add_fast_args(p, tome: bool = True) -> tuple:
    """--fast (vitkit.optimize), --precision (its precision; implies --fast) and --tome R (token merging: faster,
    slightly less exact)."""
    out = (p.add_argument("--fast", action="store_true",
                          help="the fast inference path (vitkit.optimize: prepacked oneDNN kernels on CPU, "
                          "torch.compile on GPU) in --precision"),
           p.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default=None,
                          help="the fast path's precision (implies --fast); auto (default): the fastest that agrees "
                          "with fp32 on the first batch; fp32 is exact"))
    if tome:
        out += (p.add_argument("--tome", type=int, default=0, metavar="R",
                               help="merge R tokens per block (ToMe): faster, slightly less accurate"),)
    return out


def _add_data_args(p, train: bool) -> None:
    p.add_argument("--data-dir", default="data", help="where torchvision datasets live (default: ./data)")
    p.add_argument("--download", action="store_true", help="download a torchvision dataset (needs a network)")
    p.add_argument("--val-split", type=float, default=None,
                   help="held-out fraction for PATH/<class>/* folders (default: " + ("0.1)" if train else "the run's)"))
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping")
    p.add_argument("--max-val", type=int, default=None, help="evaluate on a stratified subset of this size")
    if train:
        p.add_argument("--max-train", type=int, default=None, help="train on a stratified subset of this size")


def _add_train_args(p) -> None:
    a = p.add_argument
    a("--data", default="mnist5k", help="mnist5k (default, embedded) | digits | folder:PATH | mnist | fashion_mnist "
      "| cifar10 | cifar100 | wds:DIR (shards from `vitkit shards`; or wds:DIR/train-{000000..000009}.tar, "
      "wds:a.tar,b.tar)")
    a("--model", default=None, help="a registered model (`vitkit models`); default: the dataset's recipe")
    a("--model-arg", type=_kv, action="append", metavar="KEY=VALUE",
      help="model option, e.g. --model-arg drop_path_rate=0.1 (repeatable)")
    a("--init", default=None, help="start from these weights (checkpoint file, run folder, or a converter's input)")
    a("--init-format", default=None, choices=["vitkit", "timm", "hf", "npz", "torchvision"],
      help="format of --init when it cannot be told from the file")
    a("--img-size", type=int, default=None, help="train at this image size (with --init: resample to it)")
    a("--num-heads", type=int, default=None, help="attention heads (also of an --init state dict that does not "
      "record them)")
    a("--patch-size", type=int, default=None, help="pixels per token side (default: planned)")
    a("--embed-dim", type=int, default=None, help="model width (default: planned)")
    a("--depth", type=int, default=None, help="number of blocks (default: planned)")
    a("--stem", choices=["patch", "conv"], default=None,
      help="patchify conv, or a convolutional stem of stride-2 3x3 convs (default: planned)")
    a("--stem-channels", type=_widths, default=None, metavar="W,W,...",
      help="conv stem widths, one per conv; widths beyond one per halving are stride-1 convs at full resolution "
      "first, e.g. 32,64,128 for patch 4 ('' = one conv per halving; default: planned)")
    a("--drop-path", dest="drop_path_rate", type=float, default=None, help="stochastic depth rate")
    a("--patch-drop", dest="patch_drop_rate", type=float, default=None,
      help="PatchDropout: share of patch tokens dropped while training")
    a("--progressive", type=float, default=None, metavar="FRACTION",
      help="progressive resizing: start at this fraction of the resolution (1 = off)")
    a("--hflip", action=argparse.BooleanOptionalAction, default=None,
      help="horizontal flips (default: only for data whose class means are mirror-symmetric)")
    a("--aug-ramp", action=argparse.BooleanOptionalAction, default=None,
      help="grow the augmentation strength over the first half of the schedule")
    a("--tta", dest="tta_flip", action=argparse.BooleanOptionalAction, default=None,
      help="evaluate on each image and its mirror image, averaged")
    a("--tta-shift", dest="tta_shift", type=int, default=None, metavar="PX",
      help="evaluate also on each image shifted PX pixels left, right, up and down, averaged (0 = off; "
      "default: off)")
    a("--tta-zoom", dest="tta_zoom", type=_zooms, default=None, metavar="Z,Z,...",
      help="evaluate also on each image's centre enlarged by these factors, averaged, e.g. 1.1,1.2 ('' = off; "
      "default: planned)")
    a("--recipe", default=None, metavar="RUN", help="rerun a run's resolved recipe (its folder or config.json); "
      "flags still override")
    _add_engine_args(p, time_budget="wall-clock time for the whole command (90s, 10m, 1h): scan, plan, train, "
                     "report; 'none' for epochs (default: 4.5 minutes unless --epochs is given; with --resume: the "
                     "run's new total, time already used included)",
                     precision="auto (default): bf16 where it measures faster and trains as well as fp32, else fp32")
    a("--label-smoothing", type=float, default=None)
    a("--mixup", type=float, default=None, help="MixUp alpha (0 = off)")
    a("--cutmix", type=float, default=None, help="CutMix alpha (0 = off)")
    a("--augment", choices=["none", "light", "default", "strong"], default=None)
    a("--json", action="store_true", help="print the run summary as JSON")
    _add_data_args(p, train=True)


cmd_train.add_arguments = _add_train_args


@command("eval", "evaluate a checkpoint or run: top-1, top-5, per-class accuracy, confusion matrix")
def cmd_eval(args) -> int:
    from .tasks.classify import evaluate_checkpoint

    res = evaluate_checkpoint(args.checkpoint, args.data, out_dir=args.out, batch_size=args.batch_size,
                              device=args.device, data_dir=args.data_dir, download=args.download,
                              val_split=args.val_split, seed=args.seed, strict=args.strict, max_val=args.max_val,
                              fast=_fast(args), tome=args.tome, class_map=args.class_map,
                              precision=args.precision or "auto")
    if not _is_rank0():  # under torchrun every process holds the result; rank 0 prints it
        return 0
    if args.json:
        _print_json(res)
    else:
        print(f"{res['checkpoint']} on {res['data']} ({res['num_images']} images): top-1 {res['top1']:.2f}%  "
              f"top-5 {res['top5']:.2f}%  loss {res['val_loss']:.4f}")
        print("per class: " + "  ".join(f"{k} {v:.1f}%" for k, v in res["per_class"].items()))
        print("wrote " + ", ".join(res["outputs"]))
    return 0


cmd_eval.add_arguments = lambda p: (
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="a run folder (uses best.safetensors) or a file"),
    p.add_argument("--data", default=None, help="dataset spec (default: the one the checkpoint was trained on)"),
    p.add_argument("--class-map", default=None, metavar="FOLDER=CLASS,...|JSON",
                   help="classes are matched by name; map data classes named otherwise to the checkpoint's, as "
                   "pairs or a JSON file {\"FOLDER\": \"CLASS\"}"),
    p.add_argument("--out", default=None, help="folder for eval.json and eval_confusion.png (default: the run's)"),
    p.add_argument("--batch-size", type=int, default=500),
    p.add_argument("--device", default="auto"),
    p.add_argument("--seed", type=int, default=None, help="split seed of a PATH/<class>/* folder (default: the run's)"),
    p.add_argument("--json", action="store_true", help="print the full result as JSON"),
    _add_data_args(p, train=False),
    *_add_fast_args(p),
)


@command("shards", "write a data set as WebDataset tar shards (timm's layout) for --data wds:DIR")
def cmd_shards(args) -> int:
    from .data.shards import write_shards

    info = write_shards(args.source, args.out, shard_size=args.shard_size, resize=args.resize, seed=args.seed,
                        data_dir=args.data_dir, download=args.download, val_split=args.val_split or 0.1,
                        strict=args.strict, progress=not args.quiet)
    if args.json:
        _print_json({k: v for k, v in info.items() if k != "profile"})
        return 0
    for name, s in info["splits"].items():
        print(f"{name}: {s['num_samples']:,} samples in {len(s['filenames'])} shard(s), "
              f"{sum(s['bytes']) / 1e6:.1f} MB")
    if info["left_out_count"]:
        print(f"left out {info['left_out_count']} unreadable image(s), e.g. {info['left_out'][0]}")
    print(f"wrote {args.out} (_info.json: classes, shard lengths, sha256, image statistics); train on it with "
          f"`vitkit train --data wds:{args.out}`")
    return 0


cmd_shards.add_arguments = lambda p: (
    p.add_argument("source", metavar="FOLDER_OR_DATASET",
                   help="a folder of class folders (or folder:PATH), or a built-in set: mnist5k, digits, cifar10, ..."),
    p.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder for the shards"),
    p.add_argument("--shard-size", default="500MB", help="bytes per shard (default 500MB)"),
    p.add_argument("--resize", type=int, default=None, metavar="S",
                   help="store images with the shorter side brought down to S pixels (default: as they are)"),
    p.add_argument("--seed", type=int, default=0, help="the shuffle of the training samples over the shards, and "
                   "a folder's validation split"),
    p.add_argument("--json", action="store_true", help="print _info.json (without the profile)"),
    p.add_argument("--quiet", action="store_true", help="no progress bar"),
    p.add_argument("--val-split", type=float, default=None,
                   help="held-out fraction of a PATH/<class>/* folder (default 0.1)"),
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of leaving it out"),
    p.add_argument("--data-dir", default="data", help="where torchvision datasets live (default: ./data)"),
    p.add_argument("--download", action="store_true", help="download a torchvision dataset (needs a network)"),
)


@command("predict", "classify images: top-k labels with probabilities")
def cmd_predict(args) -> int:
    from .tasks.classify import predict

    res = predict(args.checkpoint, args.images, topk=args.topk, batch_size=args.batch_size, device=args.device,
                  strict=args.strict, fast=_fast(args), tome=args.tome, precision=args.precision or "auto")
    if args.json:
        _print_json(res)
    else:
        for r in res:
            if "error" in r:
                print(f"{r['path']}\tERROR {r['error']}")
            else:
                print(f"{r['path']}\t" + "  ".join(f"{t['label']} {t['prob']:.3f}" for t in r["topk"]))
    return 1 if any("error" in r for r in res) else 0


cmd_predict.add_arguments = lambda p: (
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file or run folder"),
    p.add_argument("images", nargs="+", metavar="IMAGES_OR_FOLDERS"),
    p.add_argument("--topk", type=int, default=5),
    p.add_argument("--batch-size", type=int, default=64),
    p.add_argument("--device", default="auto"),
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image"),
    p.add_argument("--json", action="store_true"),
    *_add_fast_args(p),
)


# ---- vitkit export (pretrained weights in, deployment formats and other layouts out) ------------------------
def _add_source_arguments(p) -> None:
    """The flags of `load_pretrained`: how to read a checkpoint of any format."""
    p.add_argument("--from", dest="fmt", choices=["vitkit", "timm", "hf", "npz", "torchvision"], default=None,
                   help="force the checkpoint format (default: detect it)")
    p.add_argument("--model", default=None, help="registered config the checkpoint was trained with "
                   "(supplies num_heads when the file does not record it)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads, when the file does not record them")
    p.add_argument("--img-size", type=int, default=None, help="resample the position embeddings to this image size")
    p.add_argument("--patch-size", type=int, default=None, help="resample the patch kernel to this patch size")
    p.add_argument("--num-classes", type=int, default=None, help="replace the head by a new one for N classes")


@command("export", "write a checkpoint (any format) as ONNX, TorchScript, an ExportedProgram, or vitkit/timm/hf/npz "
                   "weights")
def cmd_export(args) -> int:
    from .io.export import export_checkpoint

    info = export_checkpoint(args.checkpoint, args.format, args.out, overwrite=args.overwrite,
                             verify=not args.no_verify, fmt=args.fmt, model=args.model, num_heads=args.num_heads,
                             img_size=args.img_size, patch_size=args.patch_size, num_classes=args.num_classes)
    if args.json:
        _print_json(info)
    else:
        diff = f" (max abs diff to PyTorch {info['max_abs_diff']:.1e})" if "max_abs_diff" in info else ""
        print(f"wrote {info['path']} [{args.format}]{diff}")
    return 0


cmd_export.add_arguments = lambda p: (
    p.add_argument("checkpoint", help="a checkpoint file or folder (vitkit, timm, HF, npz, torchvision) or a hub "
                   "name such as timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"),
    p.add_argument("--format", required=True,
                   choices=["onnx", "torchscript", "exported-program", "vitkit", "timm", "hf", "npz"]),
    p.add_argument("--out", default=None, help="output file or folder (default: beside the checkpoint)"),
    p.add_argument("--overwrite", action="store_true", help="replace an existing output"),
    p.add_argument("--no-verify", action="store_true", help="skip running the exported graph against PyTorch"),
    p.add_argument("--json", action="store_true"),
    _add_source_arguments(p),
)


# ---- vitkit embed / index / search / eval-retrieval / explain (retrieval and attention maps) ------------------
def _grid_size(text: str):
    """'model' | 'native' | 'H' | 'HxW' → the size option of explain."""
    if text in ("model", "native"):
        return text
    try:
        parts = [int(v) for v in text.lower().split("x")]
        if len(parts) in (1, 2) and all(v > 0 for v in parts):
            return (parts[0], parts[-1])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected 'model', 'native', SIZE or HxW (e.g. 224x320), got {text!r}")


@command("embed", "embed a folder of images into L2-normalised vectors (only new or changed files on a re-run)")
def cmd_embed(args) -> int:
    from .tasks.retrieve import embed_folder

    res = embed_folder(args.checkpoint, args.folder, args.out, pool=args.pool, layer=args.layer,
                       batch_size=args.batch_size, overwrite=args.overwrite, progress=not args.quiet,
                       strict=args.strict, fast=_fast(args), precision=args.precision or "auto")
    if _is_rank0():  # under torchrun every process embeds a part and holds the result; rank 0 prints it
        _print_json(res)
    return 0


cmd_embed.add_arguments = lambda p: (
    p.add_argument("checkpoint", help="a vitkit checkpoint or run folder"),
    p.add_argument("folder", help="a folder of images (searched recursively; sub-folders are labels)"),
    p.add_argument("--out", required=True, help="embeddings file (.safetensors); an existing one is updated"),
    p.add_argument("--pool", choices=["cls", "mean", "prelogits"], default=None,
                   help="class token, mean of the patch tokens, or pre-logits (default: what the head reads)"),
    p.add_argument("--layer", type=int, default=None, help="take an earlier block's output (0-based, -1 = last)"),
    p.add_argument("--batch-size", type=int, default=64),
    p.add_argument("--overwrite", action="store_true", help="replace an --out made with another model"),
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image (default: skip it)"),
    p.add_argument("--quiet", action="store_true", help="no progress bar"),
    *_add_fast_args(p, tome=False),  # merged tokens would change the embeddings the index stores
)


@command("index", "build a faiss index from embeddings (`index build`), or add embeddings to one (`index add`)")
def cmd_index(args) -> int:
    from pathlib import Path

    from .tasks.retrieve import add_to_index, build_index_folder

    if args.action == "build":
        index = build_index_folder(args.embeddings, args.out, args.kind, overwrite=args.overwrite, nlist=args.nlist,
                                   nprobe=args.nprobe, M=args.M, ef_search=args.ef_search, ondisk=args.ondisk)
        _print_json({"index": str(Path(args.out)), "kind": index.kind, "count": len(index), "dim": index.dim,
                     "params": index.params, "storage": index.storage})
    else:
        _print_json({"index": args.index, **add_to_index(args.index, args.embeddings)})
    return 0


def _index_arguments(p):
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="a new index from one embeddings file or several (one per process or shard)")
    b.add_argument("embeddings", nargs="+", help="files from `vitkit embed` (ids follow their order)")
    b.add_argument("--out", required=True, help="index folder (index.faiss + manifest.json)")
    b.add_argument("--kind", choices=["flat", "ivf", "hnsw"], default="flat",
                   help="flat: exact inner product (default); ivf / hnsw: approximate, for large collections")
    b.add_argument("--nlist", type=int, default=None, help="IVF cells (default 4·sqrt(N))")
    b.add_argument("--nprobe", type=int, default=16, help="IVF cells searched per query")
    b.add_argument("--M", type=int, default=32, help="HNSW links per node")
    b.add_argument("--ef-search", type=int, default=64, help="HNSW candidates per query")
    b.add_argument("--ondisk", action=argparse.BooleanOptionalAction, default=None,
                   help="IVF: train once on a sample, add each file as a shard and merge the shards on disk "
                   "(index.ivfdata, searched memory-mapped); default: on for --kind ivf with several files")
    b.add_argument("--overwrite", action="store_true")
    a = sub.add_parser("add", help="append the embeddings not yet in an index (same model only)")
    a.add_argument("index", help="an index folder")
    a.add_argument("embeddings", help="a file from `vitkit embed`")


cmd_index.add_arguments = _index_arguments


@command("search", "find the nearest indexed images to query images: JSON with scores, and a PNG grid")
def cmd_search(args) -> int:
    from .tasks.retrieve import search

    _print_json(search(args.index, args.queries, args.k, checkpoint=args.checkpoint, grid=args.grid,
                       nprobe=args.nprobe, ef_search=args.ef_search, mmap=args.mmap, precision=args.precision))
    return 0


cmd_search.add_arguments = lambda p: (
    p.add_argument("index", help="an index folder from `vitkit index build`"),
    p.add_argument("queries", nargs="+", metavar="QUERY", help="query image files"),
    p.add_argument("--k", type=int, default=10, help="neighbours per query"),
    p.add_argument("--checkpoint", default=None, help="the model, where it moved since the index was built"),
    p.add_argument("--grid", default="search.png", help="PNG of queries and neighbours ('' for none)"),
    p.add_argument("--nprobe", type=int, default=None, help="IVF: cells searched per query"),
    p.add_argument("--ef-search", type=int, default=None, help="HNSW: candidates per query"),
    p.add_argument("--mmap", action="store_true", help="open the index memory-mapped (an on-disk index always is)"),
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default=None,
                   help="embed the queries with vitkit.optimize in this precision (default: the plain fp32 model); "
                   "one other than the index's is a warning"),
)


@command("eval-retrieval", "retrieval quality of a checkpoint's embeddings: recall@k, mAP@R, weighted k-NN accuracy")
def cmd_eval_retrieval(args) -> int:
    from .tasks.retrieve import evaluate_retrieval

    res = evaluate_retrieval(args.checkpoint, args.data, pool=args.pool, layer=args.layer,
                             batch_size=args.batch_size, knn_k=args.knn_k, temperature=args.temperature,
                             data_dir=args.data_dir, download=args.download, max_train=args.max_train,
                             max_val=args.max_val, progress=not args.quiet, out=args.out, fast=_fast(args),
                             precision=args.precision or "auto")
    _print_json(res)
    return 0


cmd_eval_retrieval.add_arguments = lambda p: (
    p.add_argument("checkpoint", help="a vitkit checkpoint or run folder"),
    p.add_argument("--data", required=True, help="a labelled dataset spec: mnist5k, digits, folder:PATH, cifar10, ..."),
    p.add_argument("--pool", choices=["cls", "mean", "prelogits"], default=None),
    p.add_argument("--layer", type=int, default=None),
    p.add_argument("--knn-k", type=int, default=20, help="neighbours that vote (DINO: 20)"),
    p.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(cosine / T) (DINO: 0.07)"),
    p.add_argument("--batch-size", type=int, default=256),
    p.add_argument("--max-train", type=int, default=None, help="a stratified subset of the database"),
    p.add_argument("--max-val", type=int, default=None, help="a stratified subset of the queries"),
    p.add_argument("--data-dir", default="data"),
    p.add_argument("--download", action="store_true"),
    p.add_argument("--out", default=None, help="also write the JSON here"),
    p.add_argument("--quiet", action="store_true"),
    *_add_fast_args(p, tome=False),
)


@command("explain", "attention maps (rollout or last-block class-token attention) of images: PNG + scores")
def cmd_explain(args) -> int:
    from .tasks.explain import explain_images

    _print_json(explain_images(args.checkpoint, args.images, args.out, method=args.method,
                               head_fusion=args.head_fusion, discard_ratio=args.discard_ratio, size=args.size,
                               fmt=args.format, overwrite=args.overwrite, max_tokens=args.max_tokens))
    return 0


cmd_explain.add_arguments = lambda p: (
    p.add_argument("checkpoint", help="a vitkit checkpoint or run folder"),
    p.add_argument("images", nargs="+", metavar="IMAGE"),
    p.add_argument("--method", choices=["rollout", "attention"], default="rollout",
                   help="attention rollout through all blocks, or the last block's class-token attention"),
    p.add_argument("--head-fusion", choices=["mean", "max", "min"], default="mean", help="rollout: how heads combine"),
    p.add_argument("--discard-ratio", type=float, default=0.0, help="rollout: drop this fraction of weakest links"),
    p.add_argument("--size", type=_grid_size, default="model",
                   help="input size: 'model' (the checkpoint's), 'native' (the image's own, cut to the patch) or HxW"),
    p.add_argument("--out", default="explain", help="folder for the PNGs and scores"),
    p.add_argument("--format", choices=["json", "npy"], default="json", help="patch-grid scores as JSON or .npy"),
    p.add_argument("--overwrite", action="store_true", help="replace outputs in --out that other images made"),
    p.add_argument("--max-tokens", type=int, default=4096, metavar="N",
                   help="refuse inputs above N tokens (attention-map memory grows with tokens²; 0: no cap)"),
)


# ---- vitkit serve (HTTP API + web page: vitkit.serve) ----------------------------------------------------------
@command("serve", "serve a classifier over HTTP: a web page, a JSON API with dynamic batching, KServe v2, metrics")
def cmd_serve(args) -> int:
    from .serve import ServeConfig, serve

    cfg = ServeConfig(args.checkpoint, index=args.index, device=args.device, fast=not args.no_fast,
                      precision=args.precision, calibration=args.calibration,
                      max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                      max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels,
                      timeout_s=args.timeout, body_timeout_s=args.body_timeout, api_key=args.api_key,
                      cors_origins=tuple(args.cors_origin or ()),
                      name=args.name)
    serve(cfg, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0


cmd_serve.add_arguments = lambda p: (
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="a classifier checkpoint or run folder (any that "
                   "`vitkit predict` takes)"),
    p.add_argument("--index", default=None, help="an index folder from `vitkit index build` (turns on /v1/search)"),
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)"),
    p.add_argument("--port", type=int, default=8000),
    p.add_argument("--device", default="auto"),
    p.add_argument("--no-fast", action="store_true", help="plain PyTorch instead of vitkit.optimize's fast path"),
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default="auto",
                   help="the fast path's precision; auto (default): the fastest that agrees with fp32, measured at "
                   "--max-batch-size when the server starts"),
    p.add_argument("--calibration", default=None, metavar="DIR",
                   help="images int8 is calibrated on and auto checks agreement on (default: the index's images, "
                   "else synthetic ones)"),
    p.add_argument("--max-batch-size", type=int, default=32, help="images per forward (dynamic batching)"),
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill"),
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests past which the server answers 503"),
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="request body cap (413 above it)"),
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="decoded image cap, the decompression-bomb "
                   "guard (413 above it)"),
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before a request is answered 504"),
    p.add_argument("--body-timeout", type=float, default=60.0, help="seconds a client has to send its whole request "
                   "body before it is answered 408 (a slow upload cannot hold a connection forever; 0: no limit)"),
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $VITKIT_API_KEY)"),
    p.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="allow browser calls from this origin (repeatable; CORS is off without it)"),
    p.add_argument("--name", default=None, help="the model's name in the KServe v2 routes (default: checkpoint stem)"),
    p.add_argument("--quiet", action="store_true", help="log warnings only"),
)


# ---- vitkit pretrain | reconstruct | train-gen | generate (MAE and DiT) ---------------------------------------
def _add_run_args(p, data_help: str) -> None:
    """The data and engine flags of pretrain and train-gen."""
    p.add_argument("--data", default="mnist5k", help=data_help)
    _add_engine_args(p)
    p.add_argument("--max-train", type=int, default=None, help="train on a stratified subset of this size")
    p.add_argument("--max-val", type=int, default=None)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--download", action="store_true")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")


@command("pretrain", "self-supervised pretraining of a ViT encoder (MAE) on unlabelled images")
def cmd_pretrain(args) -> int:
    from .tasks.mae import MAETaskConfig, pretrain_mae, recipe_for

    recipe = recipe_for(args.data)
    task = MAETaskConfig(data=args.data, model=args.model, model_args=dict(args.model_arg or []),
                         decoder_embed_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
                         decoder_num_heads=args.decoder_heads, mask_ratio=args.mask_ratio,
                         norm_pix_loss=args.norm_pix_loss, augment=args.augment or recipe["augment"],
                         data_dir=args.data_dir, download=args.download, max_train=args.max_train,
                         max_val=args.max_val)
    name = f"mae_{args.data.replace(':', '_').replace('/', '_')}"
    summary = pretrain_mae(task, elastic_resume(train_config_from_flags(vars(args), recipe, name)))
    _report_run(args, summary, lambda: f"held-out masked loss {summary['final'].get('val_loss', float('nan')):.4f}; "
                                       f"fine-tune with: vitkit train --data {args.data} --init {summary['run_dir']}")
    return 0


def _add_pretrain_args(p) -> None:
    p.add_argument("--method", default="mae", choices=["mae"], help="pretraining method (default: mae)")
    _add_run_args(p, "images to pretrain on (labels unused): mnist5k (default) | digits | folder:PATH | ...")
    p.add_argument("--model", default=None, help="the encoder, a registered ViT (default: the dataset's recipe)")
    p.add_argument("--model-arg", type=_kv, action="append", metavar="KEY=VALUE", help="encoder option (repeatable)")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="share of patches hidden from the encoder")
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="targets are per-patch normalised pixels (default: on, as in the paper)")
    p.add_argument("--decoder-dim", type=int, default=None)
    p.add_argument("--decoder-depth", type=int, default=None)
    p.add_argument("--decoder-heads", type=int, default=None)
    p.add_argument("--augment", choices=["none", "light", "default", "strong"], default=None)


cmd_pretrain.add_arguments = _add_pretrain_args


@command("reconstruct", "show what an MAE checkpoint reconstructs: original | masked | reconstruction | pasted")
def cmd_reconstruct(args) -> int:
    from .tasks.mae import reconstruct

    path = reconstruct(args.checkpoint, args.images, args.out, mask_ratio=args.mask_ratio, seed=args.seed)
    print(f"wrote {path}")
    return 0


cmd_reconstruct.add_arguments = lambda p: (
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="an MAE checkpoint file or run folder"),
    p.add_argument("images", nargs="+", metavar="IMAGES_OR_FOLDERS"),
    p.add_argument("--mask-ratio", type=float, default=None, help="default: the ratio it was trained with"),
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks"),
    p.add_argument("--out", default="reconstructions.png", help="the PNG to write"),
)


@command("train-gen", "train a class-conditional diffusion transformer (DiT) to generate images")
def cmd_train_gen(args) -> int:
    from .tasks.generate import GeneratorConfig, recipe_for, train_generator

    recipe = recipe_for(args.data)
    model_args = dict(recipe.pop("model_args"))
    model_args.update(dict(args.model_arg or []))
    task = GeneratorConfig(data=args.data, objective=args.objective, model_args=model_args,
                           class_dropout_prob=args.class_dropout, data_dir=args.data_dir, download=args.download,
                           init=args.init,
                           max_train=args.max_train, sample_steps=args.sample_steps, sample_cfg=args.sample_cfg,
                           **({"max_val": args.max_val} if args.max_val is not None else {}))
    tc = train_config_from_flags(vars(args), recipe, f"dit_{args.data.replace(':', '_')}")
    summary = train_generator(task, elastic_resume(tc))
    _report_run(args, summary, lambda: f"held-out {args.objective} loss "
                                       f"{summary['final'].get('val_loss', float('nan')):.4f}; "
                                       f"samples: {summary.get('samples')}")
    return 0


def _add_train_gen_args(p) -> None:
    _add_run_args(p, "mnist5k (default) | digits | mnist | fashion_mnist | cifar10 | cifar100")
    p.add_argument("--objective", choices=["flow", "ddpm"], default="flow",
                   help="flow: rectified flow, Euler sampling (default, see README); ddpm: ε-prediction, DDIM")
    p.add_argument("--model-arg", type=_kv, action="append", metavar="KEY=VALUE",
                   help="DiT option: embed_dim, depth, num_heads, patch_size, mlp_ratio (repeatable)")
    p.add_argument("--class-dropout", type=float, default=0.1, help="share of labels dropped for guidance")
    p.add_argument("--init", default=None, metavar="RUN_OR_CHECKPOINT",
                   help="start from a train-gen checkpoint's (EMA) weights with a fresh schedule (train longer)")
    p.add_argument("--sample-steps", type=int, default=50, help="sampler steps of the end-of-run sample grid")
    p.add_argument("--sample-cfg", type=float, default=2.0, help="guidance of the end-of-run sample grid")


cmd_train_gen.add_arguments = _add_train_gen_args


@command("generate", "sample images from a DiT checkpoint (PNG grid + .npy); optionally score them")
def cmd_generate(args) -> int:
    from .tasks.generate import generate_to_folder

    result = generate_to_folder(args.checkpoint, args.out, classes=args.classes, n=args.n, steps=args.steps,
                                cfg=args.cfg, seed=args.seed, classifier=args.classifier, real=args.real)
    if args.json:
        _print_json(result)
    else:
        print(f"wrote {result['png']} and {result['npy']} ({result['samples']} images)")
        if args.classifier:
            print(f"conditional accuracy {result['conditional_accuracy']:.2f}% ; classifier FID "
                  f"{result['classifier_fid']:.3f} vs real train/test floor "
                  f"{result['classifier_fid_floor_train_vs_test']:.3f}")
    return 0


cmd_generate.add_arguments = lambda p: (
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a DiT checkpoint file or train-gen run folder"),
    p.add_argument("--class", dest="classes", type=int, action="append", default=None,
                   help="class index to generate (repeatable; default: every class)"),
    p.add_argument("-n", type=int, default=16, help="images per class"),
    p.add_argument("--steps", type=int, default=50, help="sampler steps (Euler for flow, DDIM for ddpm)"),
    p.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance scale (1 = none)"),
    p.add_argument("--seed", type=int, default=0),
    p.add_argument("--out", default="samples", help="folder for the PNG grid and the .npy"),
    p.add_argument("--classifier", default=None, metavar="RUN",
                   help="score the samples with this classifier: conditional accuracy and classifier FID"),
    p.add_argument("--real", default=None, help="real data for the FID (default: the DiT's training data)"),
    p.add_argument("--json", action="store_true"),
)


# ---- the entry point -----------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with vitkit's error format: one line `vitkit: error: ...` naming the flag, exit code 2."""

    def error(self, message: str):
        msg = " ".join(str(message).split())
        print(f"vitkit: error: {msg} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _flag_names(parser: argparse.ArgumentParser) -> Dict[str, str]:
    """dest → its long option string, over a (sub)command's parser and the sub-parsers under it."""
    out: Dict[str, str] = {}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for p in a.choices.values():
                out.update({k: v for k, v in _flag_names(p).items() if k not in out})
        elif a.option_strings and a.dest not in out:
            out[a.dest] = max(a.option_strings, key=len)
    return out


# config fields whose flag's dest has another name
_FIELD_DEST = {"class_dropout_prob": "class_dropout", "decoder_embed_dim": "decoder_dim",
               "decoder_num_heads": "decoder_heads", "tome_r": "tome"}


def _flag_for(parser: argparse.ArgumentParser, args, field: str) -> str:
    """The flag that sets config field `field` in this command: `--model-arg FIELD` when it came from there,
    else the flag of the same (or mapped) name; the field's own name when no flag sets it."""
    model_args = dict(getattr(args, "model_arg", None) or [])
    flags: Dict[str, str] = {}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction) and getattr(args, "command", None) in a.choices:
            flags = _flag_names(a.choices[args.command])
    dest = _FIELD_DEST.get(field, field)
    if getattr(args, dest, None) is not None and dest in flags:  # a flag the command has, and a value it holds
        return flags[dest]
    if field in model_args:
        return f"--model-arg {field}"
    return field


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vitkit", description="Vision Transformers: train, evaluate, use.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"vitkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add = getattr(run, "add_arguments", None)
        if add:
            add(p)
        p.set_defaults(_run=run)
    return parser


# what a command line may give with --resume: the engine's resumable fields (applied, and recorded in the run's
# config.json history), --json, and `pretrain --method`, which names the task (resume_configs checks it)
_RESUME_FLAGS = {*RESUMABLE, "resume", "json", "method"}


def _check_resume_flags(args, argv: List[str]) -> None:
    """Refuse, in one line, every option given with --resume that cannot change on resume. The command line is
    parsed again with every default suppressed, so a flag counts when given, even at its default value."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    flags = {}
    for a in sub._actions:
        a.default = argparse.SUPPRESS
        if a.option_strings:
            flags[a.dest] = max(a.option_strings, key=len)
    given = vars(parser.parse_args(argv))
    refuse_on_resume(args.resume, [flags[d] for d in given if d in flags and d not in _RESUME_FLAGS])


def main(argv: Optional[List[str]] = None) -> int:
    global _STARTED
    import time

    _STARTED = time.perf_counter()  # Trainer.clock's default: the budget starts when the command does
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a flag error (printed as one line), --help or --version: an exit code, no exit
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if not getattr(args, "quiet", False) else logging.WARNING,
                        format="%(message)s")
    try:
        if getattr(args, "resume", None):
            _check_resume_flags(args, sys.argv[1:] if argv is None else argv)
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("vitkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except (VitkitError, OSError) as e:  # OSError: paths the user gave (missing, too long, read-only); any other
        if args.debug:  # exception is a bug in vitkit (or below it) and keeps its traceback
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        field = getattr(e, "field", "")
        if field and msg.startswith(field):  # a config field's error: name the flag that set it
            msg = _flag_for(parser, args, field) + msg[len(field):]
        print(f"vitkit: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
