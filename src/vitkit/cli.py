"""The `vitkit` command. Each subcommand parses its flags and makes one call into the library.

Errors that vitkit raises on purpose print as one line (`vitkit: error: ...`) with exit code 2;
`--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Dict, List, Optional

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


# ---- vitkit models -------------------------------------------------------------------------------------------
@command("models", "list the named model configs with parameters and GFLOPs")
def cmd_models(args) -> int:
    from .models import count_flops, count_params, get_config, list_models

    rows = []
    for name in list_models(args.filter or ""):
        cfg = get_config(name)
        rows.append({"name": name, "img_size": cfg.img_size, "patch": cfg.patch_size, "dim": cfg.embed_dim,
                     "depth": cfg.depth, "heads": cfg.num_heads, "params_M": round(count_params(cfg) / 1e6, 2),
                     "GFLOPs": round(count_flops(cfg)["flops"] / 1e9, 2)})
    if not rows:
        raise ValueError(f"no model matches {args.filter!r}; run `vitkit models` to see all")
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
    import torch

    from .models import count_flops, create_model

    overrides = {}
    if args.img_size:
        overrides["img_size"] = args.img_size
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    model = create_model(args.model, **overrides).eval()
    cfg = model.config
    x = torch.zeros(1, cfg.in_chans, *cfg.grid_size).repeat_interleave(cfg.patch_size, 2).repeat_interleave(
        cfg.patch_size, 3)
    with torch.no_grad():
        out = model(x)
    info = {"model": args.model, "params": sum(p.numel() for p in model.parameters()),
            "tokens": count_flops(cfg)["tokens"], "GFLOPs": round(count_flops(cfg)["flops"] / 1e9, 3),
            "input": list(x.shape), "output": list(out.shape)}
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
def _kv(text: str):
    """KEY=VALUE with VALUE read as JSON when it parses (numbers, true/false, lists), else as a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        return k.strip(), json.loads(v)
    except ValueError:
        return k.strip(), v


@command("train", "train a ViT classifier on a dataset (run folder: runs/<name>/)")
def cmd_train(args) -> int:
    import dataclasses
    import os
    from pathlib import Path

    from .tasks.classify import ClassifierConfig, recipe_for, train_classifier
    from .train import TrainConfig, parse_duration

    recipe = recipe_for(args.data)
    if args.epochs is not None and args.time_budget is None:
        recipe.pop("time_budget", None)  # an explicit epoch count replaces the recipe's wall-clock budget
    if args.time_budget is not None:
        recipe["time_budget"] = None if str(args.time_budget).lower() in ("0", "none", "off") else \
            parse_duration(args.time_budget)
    model_args = dict(recipe.pop("model_args", {}))
    if args.model and args.model != recipe.get("model"):
        model_args = {}  # the recipe's overrides belong to the recipe's model
    model_args.update(dict(args.model_arg or []))

    def pick(obj_cls, **extra):
        out = {}
        for f in dataclasses.fields(obj_cls):
            flag = getattr(args, f.name, None)
            if flag is not None:
                out[f.name] = flag
            elif f.name in recipe:
                out[f.name] = recipe[f.name]
        out.update(extra)
        return out

    task = ClassifierConfig(**pick(ClassifierConfig, model_args=model_args))
    name = args.name or (Path(args.data[len("folder:"):]).name if args.data.startswith("folder:") else args.data)
    tc = TrainConfig(**pick(TrainConfig, name=name, overwrite=args.overwrite, compile=args.compile,
                            quiet=args.quiet, resume=args.resume))
    summary = train_classifier(task, tc)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if args.json:
        _print_json(summary)
    else:
        ev = summary.get("eval", {})
        print(f"run {summary['run_dir']}: {summary['epochs']} epochs, {summary['steps']} steps in "
              f"{summary['train_seconds']:.0f} s; best top-1 {ev.get('top1', float('nan')):.2f}% "
              f"(epoch {summary['best_epoch']}), top-5 {ev.get('top5', float('nan')):.2f}%")
    return 0


def _add_data_args(p, train: bool) -> None:
    p.add_argument("--data-dir", default="data", help="where torchvision datasets live (default: ./data)")
    p.add_argument("--download", action="store_true", help="download a torchvision dataset (needs a network)")
    p.add_argument("--val-split", type=float, default=0.1, help="held-out fraction for PATH/<class>/* folders")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping")
    p.add_argument("--max-val", type=int, default=None, help="evaluate on a stratified subset of this size")
    if train:
        p.add_argument("--max-train", type=int, default=None, help="train on a stratified subset of this size")


def _add_train_args(p) -> None:
    a = p.add_argument
    a("--data", default="mnist5k", help="mnist5k (default, embedded) | digits | folder:PATH | mnist | fashion_mnist "
      "| cifar10 | cifar100")
    a("--model", default=None, help="a registered model (`vitkit models`); default: the dataset's recipe")
    a("--model-arg", type=_kv, action="append", metavar="KEY=VALUE",
      help="model option, e.g. --model-arg drop_path_rate=0.1 (repeatable)")
    a("--init", default=None, help="start from these weights (checkpoint file, run folder, or a converter's input)")
    a("--init-format", default=None, help="format of --init when it cannot be told from the file")
    a("--name", default=None, help="run name: outputs go to RUNS_DIR/NAME (default: the dataset name)")
    a("--runs-dir", default="runs")
    a("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    a("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    a("--epochs", type=int, default=None)
    a("--time-budget", default=None, metavar="DURATION",
      help="lay the schedule over this wall-clock time (90s, 10m, 1h); 'none' for epochs")
    a("--max-steps", type=int, default=None, help="stop after this many steps (a quick look; schedule unchanged)")
    a("--batch-size", type=int, default=None, help="global batch per step (split over processes)")
    a("--accum-steps", type=int, default=None, help="gradient accumulation: optimizer step every N batches")
    a("--lr", type=float, default=None)
    a("--min-lr", type=float, default=None)
    a("--weight-decay", type=float, default=None)
    a("--warmup", type=float, default=None, help="warm-up: fraction of steps (<1) or epochs (>=1)")
    a("--clip-grad", type=float, default=None, help="max gradient norm (0 = off)")
    a("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    a("--ema", dest="ema_decay", type=float, default=None, metavar="DECAY", help="EMA of weights, e.g. 0.999")
    a("--layer-decay", type=float, default=None, help="layer-wise lr decay for fine-tuning, e.g. 0.75")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--seed", type=int, default=None)
    a("--eval-every", type=int, default=None, help="evaluate and checkpoint every N epochs")
    a("--device", default=None, help="auto | cpu | cuda | cuda:N | mps")
    a("--workers", type=int, default=None, help="DataLoader workers for image folders")
    a("--label-smoothing", type=float, default=None)
    a("--mixup", type=float, default=None, help="MixUp alpha (0 = off)")
    a("--cutmix", type=float, default=None, help="CutMix alpha (0 = off)")
    a("--augment", choices=["none", "light", "default", "strong"], default=None)
    a("--quiet", action="store_true", help="no progress bar; log lines only")
    a("--json", action="store_true", help="print the run summary as JSON")
    _add_data_args(p, train=True)


cmd_train.add_arguments = _add_train_args


@command("eval", "evaluate a checkpoint or run: top-1, top-5, per-class accuracy, confusion matrix")
def cmd_eval(args) -> int:
    from .tasks.classify import evaluate_checkpoint

    data = args.data
    if data is None:
        from .io import load

        data = (getattr(load(args.checkpoint), "pretrained_cfg", None) or {}).get("dataset")
        if not data:
            raise ValueError("the checkpoint does not record its dataset; pass --data (e.g. --data mnist5k)")
    res = evaluate_checkpoint(args.checkpoint, data, out_dir=args.out, batch_size=args.batch_size,
                              device=args.device, data_dir=args.data_dir, download=args.download,
                              val_split=args.val_split, seed=args.seed, strict=args.strict, max_val=args.max_val)
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
    p.add_argument("--out", default=None, help="folder for eval.json and eval_confusion.png (default: the run's)"),
    p.add_argument("--batch-size", type=int, default=500),
    p.add_argument("--device", default="auto"),
    p.add_argument("--seed", type=int, default=0, help="the split seed of a PATH/<class>/* folder"),
    p.add_argument("--json", action="store_true", help="print the full result as JSON"),
    _add_data_args(p, train=False),
)


@command("predict", "classify images: top-k labels with probabilities")
def cmd_predict(args) -> int:
    from .tasks.classify import predict

    res = predict(args.checkpoint, args.images, topk=args.topk, batch_size=args.batch_size, device=args.device,
                  strict=args.strict)
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
)


# ---- the entry point -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitkit", description="Vision Transformers: train, evaluate, use.")
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


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if not getattr(args, "quiet", False) else logging.WARNING,
                        format="%(message)s")
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("vitkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError, ImportError) as e:
        if args.debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"vitkit: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
