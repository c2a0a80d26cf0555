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


# ---- vitkit export (pretrained weights in, deployment formats and other layouts out) ------------------------
def _add_source_arguments(p) -> None:
    """Flags shared by the commands that read any checkpoint through `load_pretrained`."""
    p.add_argument("--from", dest="fmt", choices=["vitkit", "timm", "hf", "npz", "torchvision"], default=None,
                   help="force the checkpoint format (default: detect it)")
    p.add_argument("--model", default=None, help="registered config the checkpoint was trained with "
                   "(supplies num_heads when the file does not record it)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads, when the file does not record them")
    p.add_argument("--img-size", type=int, default=None, help="resample the position embeddings to this image size")
    p.add_argument("--patch-size", type=int, default=None, help="resample the patch kernel to this patch size")
    p.add_argument("--num-classes", type=int, default=None, help="replace the head by a new one for N classes")


def _load_source(args):
    from .io import load_pretrained

    return load_pretrained(args.checkpoint, fmt=args.fmt, model=args.model, num_heads=args.num_heads,
                           img_size=args.img_size, patch_size=args.patch_size, num_classes=args.num_classes)


@command("export", "write a checkpoint (any format) as ONNX, TorchScript, an ExportedProgram, or vitkit/timm/hf/npz "
                   "weights")
def cmd_export(args) -> int:
    import os

    from .errors import RunExistsError
    from .io.export import default_output, export

    out = args.out or default_output(args.checkpoint, args.format)
    if os.path.exists(out) and not args.overwrite:  # before the (possibly long) load
        raise RunExistsError(f"{str(out)!r} exists already; choose another --out or pass --overwrite")
    model = _load_source(args)
    info = export(model, out, args.format, overwrite=args.overwrite, verify=not args.no_verify)
    info["config"] = {k: v for k, v in model.config.to_dict().items()
                      if k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "num_classes")}
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
