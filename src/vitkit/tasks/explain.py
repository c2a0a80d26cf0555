"""Where did the model look? Attention maps over the patch grid from a ViT's own attention probabilities.

- `attention_rollout` (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"): per block, fuse the
  heads (mean, max or min), optionally zero the weakest `discard_ratio` of the entries (as jacobgil/vit-explain
  does), add the identity for the residual path, re-normalise the rows, and multiply the blocks' matrices from the
  first to the last: entry (i, j) is how much input token j flows into output token i.
- `last_layer_attention`: the last block's attention of the class token to each patch, per head (DINO's maps).

What the map means depends on how the model pools. For a class-token model (global_pool='token') it is the row of
the class token, whose output feeds the head. An average-pool model (global_pool='avg', with or without a class
token) classifies from the mean of the patch outputs, so the map is the mean over all patch rows: the attention
each patch *receives*, averaged over the patches that read it. Prefix tokens (class, registers) are left out of the
map columns; they still take part in the flow.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import ConfigError

METHODS = ("rollout", "attention")
HEAD_FUSIONS = ("mean", "max", "min")
# Attention maps of inputs above this many tokens are refused unless asked (`--max-tokens`): the rollout holds a few
# (N, N) fp32 matrices, 4096 tokens (a 1024x1024 image at patch 16) → about 270 MB.
DEFAULT_MAX_TOKENS = 4096


def fuse_heads(attn: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """(B, heads, N, N) → (B, N, N)."""
    if head_fusion == "mean":
        return attn.mean(dim=1)
    if head_fusion == "max":
        return attn.amax(dim=1)
    if head_fusion == "min":
        return attn.amin(dim=1)
    raise ConfigError(f"head fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")


def _rollout_step(a: torch.Tensor, result, discard_ratio: float) -> torch.Tensor:
    """One block of the rollout: its head-fused (B, N, N) attention, weakest links dropped, identity added for the
    residual path, rows re-normalised, multiplied onto the flow so far."""
    B, N, _ = a.shape
    if discard_ratio > 0:
        flat = a.reshape(B, N * N).clone()
        k = int(N * N * discard_ratio)
        _, low = flat.topk(k, dim=-1, largest=False)
        keep_first = torch.zeros_like(flat, dtype=torch.bool)
        keep_first[:, 0] = True
        drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, low, True) & ~keep_first
        a = flat.masked_fill(drop, 0.0).reshape(B, N, N)
    a = 0.5 * a + 0.5 * torch.eye(N, dtype=a.dtype, device=a.device)
    a = a / a.sum(dim=-1, keepdim=True)
    return a if result is None else a @ result


def attention_rollout(attns: Sequence[torch.Tensor], head_fusion: str = "mean",
                      discard_ratio: float = 0.0) -> torch.Tensor:
    """Per-block attention probabilities [(B, heads, N, N)] → the rolled-out (B, N, N) token-to-token flow.
    `discard_ratio` zeroes that fraction of each fused matrix's smallest entries (never the first token's
    attention to itself), which sharpens the map by removing the diffuse floor."""
    if not 0.0 <= discard_ratio < 1.0:
        raise ConfigError(f"discard ratio must be in [0, 1), got {discard_ratio}")
    result = None
    for attn in attns:
        result = _rollout_step(fuse_heads(attn.float(), head_fusion), result, discard_ratio)
    return result


def _readout_row(mat: torch.Tensor, num_prefix_tokens: int, has_class_token: bool) -> torch.Tensor:
    """(B, [heads,] N, N) → (B, [heads,] patches): the class token's row over the patch columns, or, without a
    class token, the mean of the patch rows (the attention each patch receives, averaged over the readers)."""
    cols = mat[..., num_prefix_tokens:]
    if has_class_token:
        return cols[..., 0, :]
    return cols[..., num_prefix_tokens:, :].mean(dim=-2)


def last_layer_attention(attns: Sequence[torch.Tensor], num_prefix_tokens: int,
                         has_class_token: bool = True) -> torch.Tensor:
    """The last block's attention, per head, read out as the map: (B, heads, patches)."""
    return _readout_row(attns[-1].float(), num_prefix_tokens, has_class_token)


def reads_class_token(model) -> bool:
    """Whether the model's head reads the class token (else it reads the mean of the patch tokens)."""
    return bool(model.has_class_token and model.global_pool == "token")


def map_meaning(model, method: str) -> str:
    """One sentence that says what the map shows for this model and method."""
    regs = f" ({model.num_reg_tokens} register token(s) take part in the flow but are not shown)" \
        if model.num_reg_tokens else ""
    if reads_class_token(model):
        what = ("how much each patch flows into the class token through all blocks (attention rollout)"
                if method == "rollout" else "the class token's attention to each patch in the last block")
    else:
        why = "has no class token" if not model.has_class_token else "ignores its class token"
        what = (f"this model {why} and classifies from the mean of the patch tokens, so the map is the mean over "
                "all patch tokens of the rolled-out attention each patch receives" if method == "rollout"
                else f"this model {why} and classifies from the mean of the patch tokens, so the map is the mean "
                     "attention each patch receives from all patch tokens in the last block")
    return what + regs


@dataclass
class Explanation:
    """Maps over the patch grid for one batch: `map` (B, gh, gw), `heads` (B, heads, gh, gw) from the last block,
    the logits, and the sentence that says what the map means."""

    map: torch.Tensor
    heads: torch.Tensor
    logits: torch.Tensor
    grid: Tuple[int, int]
    method: str
    meaning: str
    params: dict = field(default_factory=dict)

    def peaks(self) -> List[Tuple[int, int]]:
        """The (row, col) of each map's maximum on the patch grid."""
        gw = self.grid[1]
        flat = self.map.reshape(self.map.shape[0], -1).argmax(dim=1)
        return [(int(i) // gw, int(i) % gw) for i in flat]


def token_count(model, size: Tuple[int, int]) -> int:
    """Tokens the model sees for an (H, W) input: its patches plus the class/register tokens."""
    gh, gw = model.patch_embed.dynamic_feat_size(tuple(size))
    return gh * gw + model.num_prefix_tokens


def check_tokens(model, size: Tuple[int, int], max_tokens: Optional[int] = DEFAULT_MAX_TOKENS) -> None:
    """Refuse an input whose attention maps would take more than `max_tokens` tokens (memory grows with tokens²),
    before the image is even preprocessed; None or 0 lifts the cap."""
    n = token_count(model, size)
    if max_tokens and n > max_tokens:
        gb = 4 * 4 * n * n / 1e9  # the rollout's few (N, N) fp32 matrices
        raise ConfigError(f"an input of {size[0]}x{size[1]} pixels is {n} tokens, above the attention-map cap of "
                          f"{max_tokens} (their memory grows with tokens², about {gb:.1f} GB here); pass --max-tokens "
                          f"{n} to allow it, or a smaller --size")


@torch.no_grad()
def explain(model, x: torch.Tensor, method: str = "rollout", head_fusion: str = "mean",
            discard_ratio: float = 0.0, max_tokens: Optional[int] = DEFAULT_MAX_TOKENS) -> Explanation:
    """Images (B, C, H, W) at any size the model accepts → attention maps over their patch grid. The attention
    is consumed block by block as the model computes it (`forward_attention`): memory holds a few (B, N, N)
    matrices, never every block's (B, heads, N, N); inputs above `max_tokens` tokens are refused."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if head_fusion not in HEAD_FUSIONS:
        raise ConfigError(f"head fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ConfigError(f"discard ratio must be in [0, 1), got {discard_ratio}")
    check_tokens(model, x.shape[-2:], max_tokens)
    model.eval()
    gh, gw = model.patch_embed.dynamic_feat_size(x.shape[-2:])
    npt, cls, last = model.num_prefix_tokens, reads_class_token(model), len(model.blocks) - 1
    state = {"fused": None, "flow": None, "heads": None}

    def sink(block: int, p: torch.Tensor, r0: int) -> None:
        B, H, rows, N = p.shape
        if method == "rollout":
            if r0 == 0:
                state["fused"] = torch.empty(B, N, N, dtype=torch.float32, device=p.device)
            state["fused"][:, r0:r0 + rows] = fuse_heads(p.float(), head_fusion)
            if r0 + rows == N:
                state["flow"] = _rollout_step(state["fused"], state["flow"], discard_ratio)
                state["fused"] = None
        if block == last:  # the last block's map per head: the class token's row, or the mean of the patch rows
            if cls:
                if r0 == 0:
                    state["heads"] = p[:, :, 0, npt:].float().clone()
            else:
                if r0 == 0:
                    state["heads"] = torch.zeros(B, H, N - npt, dtype=torch.float32, device=p.device)
                lo = max(r0, npt) - r0
                if lo < rows:
                    state["heads"] += p[:, :, lo:, npt:].float().sum(dim=2)
                if r0 + rows == N:
                    state["heads"] /= N - npt

    logits = model.forward_attention(x, sink)
    heads = state["heads"]
    m = _readout_row(state["flow"], npt, cls) if method == "rollout" else heads.mean(dim=1)
    B = x.shape[0]
    return Explanation(m.reshape(B, gh, gw), heads.reshape(B, heads.shape[1], gh, gw), logits, (gh, gw), method,
                       map_meaning(model, method),
                       {"head_fusion": head_fusion, "discard_ratio": discard_ratio} if method == "rollout" else {})


def upsample(grid_map: torch.Tensor, size: Tuple[int, int]) -> np.ndarray:
    """(gh, gw) → (H, W) by bilinear interpolation, scaled to [0, 1] for display."""
    m = torch.nn.functional.interpolate(grid_map[None, None].float(), size=size, mode="bilinear",
                                        align_corners=False)[0, 0]
    m = m - m.min()
    return (m / m.max().clamp(min=1e-12)).numpy()


def output_stems(images: Sequence, out) -> List[Path]:
    """Where each image's outputs go (without suffix): its path relative to the images' common folder, under `out`,
    so a/x.png and b/x.png never share a name; files differing only by extension keep it (x.jpg → x.jpg.png)."""
    import os

    files = [Path(p).resolve() for p in images]
    if not files:
        return []
    common = Path(os.path.commonpath([str(f.parent) for f in files]))
    rel = [f.relative_to(common) for f in files]
    stems = [r.with_suffix("") for r in rel]
    owners: dict = {}
    for f, s in zip(files, stems):
        owners.setdefault(s, set()).add(f)
    return [Path(out) / (r if len(owners[s]) > 1 else s) for r, s in zip(rel, stems)]


def figure_source(png) -> Optional[str]:
    """The image a figure from `save_figure` was made from (its PNG 'Source' text), or None."""
    from ..data.images import image_text

    return image_text(png).get("Source")


def check_outputs(images: Sequence, stems: Sequence[Path], suffix: str, overwrite: bool = False) -> None:
    """Refuse, before anything is computed, to replace an output that another image made (or one of unknown
    origin), unless `overwrite`: re-explaining the same image replaces its own files."""
    if overwrite:
        return
    for img, stem in zip(images, stems):
        png, scores = Path(f"{stem}.png"), Path(f"{stem}{suffix}")
        if not png.exists() and not scores.exists():
            continue
        owner = figure_source(png) if png.exists() else None
        if owner != str(Path(img).resolve()):
            taken = png if png.exists() else scores
            raise FileExistsError(f"{str(taken)!r} exists and belongs to {owner or 'something else'}, not to "
                                  f"{str(img)!r}; pass --overwrite to replace it, or choose another --out")


def save_figure(path, image: np.ndarray, expl: Explanation, i: int = 0, title: str = "",
                source: Optional[str] = None) -> Path:
    """A PNG: the image, the map laid over it, the map itself, then the last block's per-head maps. `source` (the
    image's path) is recorded in the PNG's text, so a later run knows whose file it is."""
    from ..io.plots import pyplot, save_png

    plt = pyplot()
    H, W = image.shape[:2]
    heads = expl.heads[i]
    n_heads = heads.shape[0]
    top = 3
    cols = max(top, min(n_heads, 8))
    rows = 1 + (n_heads + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    gray = image.shape[2] == 1
    img = image[..., 0] if gray else image
    heat = upsample(expl.map[i], (H, W))
    axes[0][0].imshow(img, cmap="gray" if gray else None)
    axes[0][0].set_title("image", fontsize=9)
    axes[0][1].imshow(img, cmap="gray" if gray else None)
    axes[0][1].imshow(heat, cmap="jet", alpha=0.5)
    label = expl.method + (f" ({expl.params['head_fusion']}, discard {expl.params['discard_ratio']:g})"
                           if expl.method == "rollout" else " (last block, mean of heads)")
    axes[0][1].set_title(label, fontsize=9)
    axes[0][2].imshow(expl.map[i].numpy(), cmap="viridis")
    axes[0][2].set_title(f"patch grid {expl.grid[0]}x{expl.grid[1]}", fontsize=9)
    for h in range(n_heads):
        ax = axes[1 + h // cols][h % cols]
        ax.imshow(img, cmap="gray" if gray else None)
        ax.imshow(upsample(heads[h], (H, W)), cmap="jet", alpha=0.5)
        ax.set_title(f"last block, head {h}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_png(fig, path, dpi=90, metadata={"Source": str(source)} if source else None)


def explain_images(checkpoint, images: Sequence, out="explain", *, method: str = "rollout", head_fusion: str = "mean",
                   discard_ratio: float = 0.0, size="model", fmt: str = "json", overwrite: bool = False,
                   max_tokens: Optional[int] = DEFAULT_MAX_TOKENS) -> List[dict]:
    """Per image, a figure (`out/<stem>.png`) and its patch-grid scores (`.json` or `.npy`) from a checkpoint's
    attention; `size` is 'model', 'native' (the image's own) or (H, W). Returns one summary row per image."""
    import json

    from .. import validate as v
    from ..io.checkpoint import atomic_write, check_finite_outputs, load_vit
    from ..data.inputs import denormalize, load_batch, native_size, open_image, preprocessing

    v.choice(fmt, "format", ("json", "npy"))
    if size not in ("model", "native") and not (isinstance(size, (tuple, list)) and len(size) == 2 and all(
            isinstance(s, int) and s > 0 for s in size)):
        raise ConfigError(f"size must be 'model', 'native' or (height, width), got {size!r}")
    out = Path(out)
    stems = output_stems(images, out)  # relative paths kept: a/x.png and b/x.png never share a name
    check_outputs(images, stems, "." + fmt, overwrite)
    model = load_vit(checkpoint, "explain")  # an MAE: its encoder; a DiT: a one-line error
    pcfg = preprocessing(model)
    out.mkdir(parents=True, exist_ok=True)
    names = (pcfg.get("class_names") or None)
    rows = []
    for path, stem in zip(images, stems):
        size_ = None
        if size == "native":
            size_ = native_size(open_image(path, model.config.in_chans), model.patch_embed.patch_size[0])
        elif size != "model":
            size_ = tuple(size)
        check_tokens(model, size_ or tuple(pcfg["input_size"][1:]), max_tokens)  # before the image grows
        x = load_batch([path], model, size=size_)
        e = explain(model, x, method, head_fusion, discard_ratio, max_tokens=max_tokens)
        check_finite_outputs(e.logits, str(checkpoint), [path])
        prob = e.logits.softmax(-1)[0] if e.logits.ndim == 2 and e.logits.shape[-1] > 1 else None
        pred = int(prob.argmax()) if prob is not None else None
        label = names[pred] if names and pred is not None and pred < len(names) else pred
        png = save_figure(Path(f"{stem}.png"), denormalize(x[0], pcfg), e, 0,
                          title=f"{Path(path).name}: predicted {label}" if label is not None else Path(path).name,
                          source=str(Path(path).resolve()))
        scores = e.map[0].numpy()
        if fmt == "npy":
            spath = Path(f"{stem}.npy")

            def _write_npy(tmp, arr=scores):
                with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to the temp name
                    np.save(f, arr)

            atomic_write(spath, _write_npy)
        else:
            spath = Path(f"{stem}.json")
            doc = {"image": str(path), "method": e.method, **e.params, "grid": list(e.grid),
                   "input_size": list(x.shape[-2:]), "meaning": e.meaning, "predicted": label,
                   "map": scores.round(6).tolist(), "heads": e.heads[0].numpy().round(6).tolist()}
            atomic_write(spath, lambda tmp: Path(tmp).write_text(json.dumps(doc)))
        rows.append({"image": str(path), "png": str(png), "scores": str(spath), "predicted": label,
                     "peak": list(e.peaks()[0]), "grid": list(e.grid), "meaning": e.meaning})
    return rows


__all__ = ["METHODS", "HEAD_FUSIONS", "DEFAULT_MAX_TOKENS", "token_count", "check_tokens", "fuse_heads",
           "attention_rollout", "last_layer_attention", "explain", "Explanation", "map_meaning", "reads_class_token",
           "upsample", "save_figure", "output_stems", "check_outputs", "figure_source", "explain_images"]
