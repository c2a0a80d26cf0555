"""Export a model for deployment (ONNX, TorchScript, torch.export ExportedProgram) or write its weights back in
another layout (timm, Hugging Face, Google npz, vitkit). Every graph export has a dynamic batch dimension and is
checked against the PyTorch model on a random batch; nothing existing is overwritten unless asked.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError, RunExistsError
from ..models import Preprocessing
from ..models.deit import VisionTransformerDistilled
from . import convert
from .checkpoint import atomic_write, save

log = logging.getLogger(__name__)

GRAPH_FORMATS = ("onnx", "torchscript", "exported-program")
WEIGHT_FORMATS = ("vitkit", "timm", "hf", "npz")
EXPORT_FORMATS = GRAPH_FORMATS + WEIGHT_FORMATS
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported-program": ".pt2",
          "vitkit": ".vitkit.safetensors", "timm": "-timm", "hf": "-hf", "npz": ".npz"}


def default_output(checkpoint, fmt: str) -> Path:
    """Where `vitkit export CHECKPOINT --format F` writes by default: beside the checkpoint, named after it."""
    p = Path(str(checkpoint))
    if p.exists():
        stem = p.name[: -len(p.suffix)] if p.suffix else p.name
        return p.parent / f"{stem}{SUFFIX[fmt]}" if not p.is_dir() else p / f"model{SUFFIX[fmt]}"
    return Path(str(checkpoint).replace("/", "--").replace(":", "-") + SUFFIX[fmt])


def _example(model, batch: int = 2) -> torch.Tensor:
    h, w = model.patch_embed.img_size
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, model.in_chans, h, w, generator=g)


def _check_dest(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise RunExistsError(f"{str(path)!r} exists already; choose another --out or pass --overwrite")


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def export_onnx(model, path: Path, opset: int = 18) -> None:
    """ONNX with a dynamic batch axis; the preprocessing goes into the file's metadata_props."""
    try:
        import onnx
    except ImportError:
        raise ConfigError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'vitkit[export]'") from None
    x = _example(model)
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):  # their INFO lines would drown the CLI's output
        logging.getLogger(name).setLevel(logging.WARNING)

    def write(tmp):
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.onnx.export(model, (x,), tmp, input_names=["pixel_values"], output_names=["logits"],
                          dynamic_shapes={"x": {0: batch}}, opset_version=opset, dynamo=True, verbose=False,
                          external_data=False)
        m = onnx.load(tmp)
        for k, v in (getattr(model, "pretrained_cfg", None) or {}).items():
            m.metadata_props.add(key=k, value=json.dumps(v))
        m.metadata_props.add(key="vitkit_config", value=json.dumps(model.config.to_dict()))
        onnx.save(m, tmp)

    atomic_write(path, write)


def verify_onnx(model, path: Path, batch: int = 3) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _example(model, batch)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    return _max_diff(got, want)


def export_torchscript(model, path: Path) -> None:
    """A traced TorchScript module; the traced reshapes follow the input's batch size."""
    import warnings

    x = _example(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit's deprecation notice, and the traced no-op resample branch
        traced = torch.jit.trace(model, (x,), check_trace=False)
    atomic_write(path, lambda tmp: torch.jit.save(traced, tmp))


def export_program(model, path: Path) -> None:
    """A `torch.export` ExportedProgram (`.pt2`, load with `torch.export.load`) with a dynamic batch."""
    x = _example(model)
    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: torch.export.save wants a .pt2 name otherwise
            torch.export.save(ep, f)

    atomic_write(path, write)


def verify_graph(model, path: Path, fmt: str, batch: int = 3) -> float:
    """Max abs difference between the exported file, loaded back, and the model on a batch of another size."""
    if fmt == "onnx":
        return verify_onnx(model, path, batch)
    x = _example(model, batch)
    if fmt == "torchscript":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            loaded = torch.jit.load(str(path))
    else:
        loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        return _max_diff(loaded(x).numpy(), model(x).numpy())


# ---- weights in other layouts ---------------------------------------------------------------------------------
def _unsupported(model, fmt: str, allowed: dict) -> None:
    c = model.config
    bad = [name for name, ok in allowed.items() if not ok(c)]
    if isinstance(model, VisionTransformerDistilled) and fmt != "timm":
        bad.append("a distillation token and head")
    if bad:
        raise CheckpointError(f"the {fmt} layout cannot hold this model: it has {', '.join(bad)}; export it as "
                              "vitkit or timm instead")


def _write_folder(folder: Path, files: dict, overwrite: bool) -> None:
    """Write {name: writer(path)} into a fresh temp folder, then move it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name, write in files.items():
            write(tmp / name)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _preprocessing(model) -> dict:
    """The model's recorded preprocessing over vitkit's defaults, so exported configs have every field."""
    return Preprocessing.of(model).to_dict()


def _json_writer(obj):
    return lambda p: Path(p).write_text(json.dumps(obj, indent=2) + "\n")


def export_hf(model, folder: Path, overwrite: bool = False) -> None:
    """A Hugging Face folder (`config.json`, `model.safetensors`, `preprocessor_config.json`) that
    `ViTForImageClassification.from_pretrained` (or `ViTModel` without a head) loads."""
    from safetensors.torch import save_file

    c = model.config
    _unsupported(model, "hf", {
        "register tokens": lambda c: c.reg_tokens == 0, "LayerScale": lambda c: not c.init_values,
        "QK-norm": lambda c: not c.qk_norm, "no class token": lambda c: c.class_token,
        "average pooling": lambda c: model.global_pool == "token", "pos-embed without class slot":
        lambda c: not c.no_embed_class, "a pre-norm": lambda c: not c.pre_norm,
        "a convolutional stem": lambda c: c.stem == "patch"})
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    h, w = model.patch_embed.img_size
    if h != w:
        raise CheckpointError("the hf layout holds square image sizes only; set_input_size to a square size first")
    pcfg = _preprocessing(model)
    tensors, config = convert.to_hf(state, c.num_heads, c.embed_dim, c.depth, int(c.embed_dim * c.mlp_ratio), h,
                                    c.patch_size, c.in_chans, c.norm_eps, c.qkv_bias, pcfg.get("class_names"))
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    resample = {v: k for k, v in {0: "nearest", 2: "bilinear", 3: "bicubic"}.items()}
    pp = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": h, "width": w},
          "resample": resample.get(pcfg["interpolation"], 2), "do_rescale": True,
          "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": pcfg["mean"],
          "image_std": pcfg["std"]}
    _write_folder(folder, {"model.safetensors": lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
                           "config.json": _json_writer(config), "preprocessor_config.json": _json_writer(pp)},
                  overwrite)


def export_timm(model, path: Path, overwrite: bool = False) -> None:
    """timm weights: a `.safetensors`/`.pth` file, or a hub-style folder (`model.safetensors` + `config.json` with
    architecture, model_args and pretrained_cfg) that timm and vitkit both read."""
    from safetensors.torch import save_file

    distilled = isinstance(model, VisionTransformerDistilled)
    state = convert.to_timm({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()},
                            distilled)
    path = Path(path)
    if path.suffix in (".pth", ".pt", ".bin"):
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        return
    if path.suffix == ".safetensors":
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        return
    c = model.config
    if c.stem != "patch":
        raise CheckpointError("a timm hub folder names a model timm builds from arguments, and timm builds a "
                              "convolutional stem only through HybridEmbed(ConvStem); export the weights as a "
                              ".safetensors or .pth file instead (the keys are timm's HybridEmbed layout)")
    keys = ("img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth", "num_heads",
            "mlp_ratio", "qkv_bias", "qk_norm", "init_values", "class_token", "reg_tokens", "no_embed_class",
            "pre_norm", "fc_norm", "patch_drop_rate")
    args = {k: v for k, v in c.to_dict().items() if k in keys}
    if distilled:
        args.pop("reg_tokens")
    pcfg = _preprocessing(model)
    arch = ("deit_tiny_distilled_patch16_224" if distilled else c.name) or "vit_base_patch16_224"
    config = {"architecture": arch, "num_classes": c.num_classes, "num_features": c.embed_dim, "model_args": args,
              "pretrained_cfg": {"input_size": pcfg.get("input_size"), "interpolation": pcfg.get("interpolation"),
                                 "mean": pcfg.get("mean"), "std": pcfg.get("std"), "crop_pct": pcfg.get("crop_pct"),
                                 "num_classes": c.num_classes, "label_names": pcfg.get("class_names")}}
    _write_folder(path, {"model.safetensors": lambda p: save_file(state, str(p), metadata={"format": "pt"}),
                         "config.json": _json_writer(config)}, overwrite)


def export_npz(model, path: Path, big_vision: bool = False) -> None:
    """Google Flax `.npz`: the vit_jax layout (timm's `_load_weights` reads it), or big_vision's when the model adds
    position embeddings before the class token (`no_embed_class`) or `big_vision=True`."""
    c = model.config
    _unsupported(model, "npz", {
        "register tokens": lambda c: c.reg_tokens == 0, "LayerScale": lambda c: not c.init_values,
        "QK-norm": lambda c: not c.qk_norm, "a pre-norm": lambda c: not c.pre_norm,
        "an fc_norm after pooling": lambda c: not isinstance(model.fc_norm, torch.nn.LayerNorm),
        "average pooling together with a class token": lambda c: not (c.class_token and model.global_pool == "avg"),
        "a convolutional stem": lambda c: c.stem == "patch"})
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    arrays = convert.to_npz(state, c.num_heads, c.depth, big_vision=big_vision or c.no_embed_class)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def export(model, path, fmt: str, *, overwrite: bool = False, verify: bool = True) -> dict:
    """Write `model` to `path` in `fmt` (one of EXPORT_FORMATS). Returns {'path', 'format', 'max_abs_diff'?}."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    path = Path(path)
    _check_dest(path, overwrite)
    model = model.eval()
    info = {"path": str(path), "format": fmt}
    if fmt == "onnx":
        export_onnx(model, path)
    elif fmt == "torchscript":
        export_torchscript(model, path)
    elif fmt == "exported-program":
        export_program(model, path)
    elif fmt == "vitkit":
        save(model, path)
    elif fmt == "timm":
        export_timm(model, path, overwrite)
    elif fmt == "hf":
        export_hf(model, path, overwrite)
    elif fmt == "npz":
        export_npz(model, path)
    if verify and fmt in GRAPH_FORMATS:
        info["max_abs_diff"] = verify_graph(model, path, fmt)
        log.info("%s: max abs difference to PyTorch on a batch of 3: %.2e", path, info["max_abs_diff"])
    return info


def export_checkpoint(checkpoint, format: str, out=None, *, overwrite: bool = False, verify: bool = True,
                      **source) -> dict:
    """A checkpoint of any format (`load_pretrained(checkpoint, **source)`) written as `format` to `out` (default:
    beside it); `export`'s info plus the model's shape ('config'). An existing `out` is refused before the load."""
    import os

    from .pretrained import load_pretrained

    out = out or default_output(checkpoint, format)
    if os.path.exists(out) and not overwrite:  # before the (possibly long) load
        raise RunExistsError(f"{str(out)!r} exists already; choose another --out or pass --overwrite")
    model = load_pretrained(checkpoint, **source)
    info = export(model, out, format, overwrite=overwrite, verify=verify)
    info["config"] = {k: v for k, v in model.config.to_dict().items()
                      if k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "num_classes")}
    return info
