"""The model side of the server, without HTTP: load the checkpoint as `vitkit predict` does, and compute batches
with the task functions `vitkit predict`, `embed`, `explain` and `search` use (`classify_logits`, `embed_images`,
`explain`, `Index.neighbours`), so the server's answers are theirs. Preprocessing is the checkpoint's own
(`data.inputs.preprocessing` / `data.eval_transform`)."""
from __future__ import annotations

import base64
import io
import json
import logging
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from ..models.fast import precision_record
from .config import ServeConfig
from .errors import ServeError

log = logging.getLogger(__name__)

# explain options a request may set (each its own batch group); the values `vitkit explain` accepts
EXPLAIN_METHODS = ("rollout", "attention")
HEAD_FUSIONS = ("mean", "max", "min")
TRIM_EVERY_S = 1.0  # how often the model worker hands free heap pages back (RSS flat; cost within run-to-run noise)
DISPLAY = 224  # the explain PNGs are drawn at least this many pixels high, so a 28-pixel digit is visible


def _libc_trim():
    """glibc's malloc_trim, or None elsewhere."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class Service:
    """A loaded classifier (plain, and optimized for classify / embed), its preprocessing, class names and an
    optional index. `load()` is slow (weights, sha256, warm-up); everything else is per batch."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.ready = False
        self.error: Optional[str] = None
        self.model = self.fast = self.index = None
        self.names: List[str] = []
        self.info: dict = {}
        self._trim, self._trimmed = _libc_trim(), 0.0

    def release_memory(self) -> None:
        """Give the heap's free pages back to the system (glibc malloc_trim), at most once every TRIM_EVERY_S on
        the model worker: the fast path keeps freed buffers in the heap (models.fast.tune_malloc), and with batch
        sizes varying from request to request that heap fragments and resident memory creeps up over a long run."""
        if self._trim is None or time.monotonic() - self._trimmed < TRIM_EVERY_S:
            return
        self._trim(0)
        self._trimmed = time.monotonic()

    # ---- loading ---------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Load weights, index and preprocessing, then warm up; `ready` turns True at the end."""
        from ..models.fast import optimize
        from ..tasks.classify import load_classifier, tta_of
        from ..data import eval_transform
        from ..data.inputs import preprocessing
        from ..models import Preprocessing
        from ..runtime import resolve_device
        from ..tasks.retrieve import default_pool, file_sha256, resolve_checkpoint

        cfg = self.cfg
        t0 = time.perf_counter()
        if cfg.extra.get("before_load"):
            cfg.extra["before_load"]()
        self.device = resolve_device(cfg.device)
        self.model, self.names = load_classifier(cfg.checkpoint, self.device)
        self.pcfg = preprocessing(self.model)
        self.tta = tta_of(self.pcfg, repr(str(cfg.checkpoint)))  # the test-time views `vitkit predict` averages
        self.transform = eval_transform(Preprocessing.from_dict(self.pcfg))
        self.pixels, self.scaling = _split_scaling(self.transform)
        self.channels = self.model.config.in_chans
        self.input_size = list(self.pcfg["input_size"])
        self.pool, self.layer = default_pool(self.model), None
        ckpt = resolve_checkpoint(cfg.checkpoint)
        self.sha256 = file_sha256(ckpt)
        if cfg.index:
            self._load_index(cfg.index, ckpt)
        self.fast = (optimize(self.model, precision=cfg.precision, calibration=self._calibration())
                     if cfg.fast else self.model)
        if self.index is not None:
            from ..tasks.retrieve import warn_precision

            warn_precision((self.index.model or {}).get("precision", "fp32"), precision_record(self.fast)["precision"],
                           f"index {cfg.index!r}")
        self.info = self._describe(ckpt)
        if cfg.warmup:
            for n in sorted({1, cfg.max_batch_size}):
                x = torch.zeros(n, *self.input_size)
                self.classify([x[i] for i in range(n)])
                self.embed([x[i] for i in range(n)])
            self.explain([(torch.zeros(*self.input_size), ("rollout", "mean", 0.0))])
        log.info("serving %s (%s) in %.1f s", ckpt, self.info["backend"], time.perf_counter() - t0)
        self.ready = True

    def _calibration(self) -> Optional[torch.Tensor]:
        """precision="auto" measures at max_batch_size and checks agreement with fp32 on real images where it has
        them (--calibration's folder, else the index's images); on synthetic ones (smooth noise) otherwise. int8
        (and auto's int8 candidate) is calibrated on the same images (`vitkit.models.quantize`)."""
        if self.cfg.precision not in ("auto", "int8"):
            return None
        from ..data import list_images
        from ..data.inputs import open_image
        from ..errors import DataError

        n = self.cfg.max_batch_size
        files = []
        if self.cfg.calibration:
            files = list_images(Path(self.cfg.calibration))[:n]
        elif self.index is not None:
            files = [Path(p) for p in self.index.paths if p and Path(p).is_file()][:n]
        xs = []
        for f in files:
            try:
                xs.append(self.transform(open_image(f, self.channels)))
            except (DataError, OSError) as e:  # a bad calibration file is skipped, not fatal
                log.warning("calibration image %s skipped (%s)", f, e)
        if xs:
            decoded = len(xs)
            xs = (xs * (n // len(xs) + 1))[:n]
            what = ("int8 calibrated" if self.cfg.precision == "int8" else
                    "precision auto: agreement checked (and its int8 candidate calibrated)")
            log.info("%s on %d real images", what, decoded)
            return torch.stack(xs).to(self.device)
        if self.cfg.precision == "int8":  # int8 is calibrated on real images only; without them it stays dynamic
            return None
        log.info("precision auto: agreement checked on synthetic images (pass --calibration DIR for real ones)")
        g = torch.Generator().manual_seed(0)
        h, w = self.input_size[1:]
        low = torch.randn(n, self.channels, max(1, h // 8), max(1, w // 8), generator=g)
        return torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).to(self.device)

    def _load_index(self, path, ckpt) -> None:
        """The index, refused unless it was built with this very model (same weights, pooling, layer, size)."""
        from ..tasks.retrieve import Index, check_same_model, model_manifest

        self.index = Index.load(path)
        im = self.index.model or {}
        self.pool, self.layer = im.get("pool") or self.pool, im.get("layer")
        check_same_model(im, model_manifest(self.model, ckpt, self.pool, self.layer), what=f"index {str(path)!r}")

    def _describe(self, ckpt: Path) -> dict:
        """GET /v1/model: what is served, with the training figures (`training_card`) and the limits."""
        c = self.model.config
        report = training_card(Path(self.cfg.checkpoint), ckpt)
        return {"name": self.model_name(ckpt), "checkpoint": ckpt.name, "sha256": self.sha256,
                "architecture": f"ViT {c.embed_dim}-d, {c.depth} blocks, {c.num_heads} heads, patch {c.patch_size}",
                "params": sum(p.numel() for p in self.model.parameters()), "config": c.to_dict(),
                "classes": self.names, "preprocessing": {k: v for k, v in self.pcfg.items() if k != "class_names"},
                "device": str(self.device), "backend": getattr(self.fast, "backend", "eager"),
                **precision_record(self.fast),
                "embedding": {"pool": self.pool, "layer": self.layer, "dim": int(self.model.embed_dim)},
                "index": ({"count": len(self.index), "kind": self.index.kind} if self.index is not None else None),
                "report": report,
                "limits": {k: getattr(self.cfg, k) for k in ("max_batch_size", "max_wait_ms", "max_queue",
                                                             "max_upload_bytes", "max_pixels", "timeout_s",
                                                             "body_timeout_s")}}

    def model_name(self, ckpt: Optional[Path] = None) -> str:
        if self.cfg.name:
            return self.cfg.name
        p = Path(self.cfg.checkpoint)
        return p.name if p.is_dir() else p.stem

    # ---- per request (in a thread) -----------------------------------------------------------------------------
    def preprocess(self, image) -> torch.Tensor:
        """A decoded PIL image → its resized, cropped pixels (C, H, W) uint8, by the checkpoint's preprocessing; the
        model worker scales and normalises a whole batch at once (`inputs`): the same arithmetic per value, one
        vectorised op on the worker's threads instead of one per request on the decoding threads, which would compete
        with the model for the cores (profiled at 32 clients: ~9% of the server's CPU)."""
        return self.pixels(image)

    def inputs(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Items from `preprocess` (uint8) or already-normalised float inputs (KServe v2 FP32) → the model's batch
        (B, C, H, W), exactly what `eval_transform` gives per image."""
        if all(x.dtype == torch.uint8 for x in xs):
            return self.scaling(torch.stack(list(xs))).to(self.device)
        return torch.stack([self.scaling(x) if x.dtype == torch.uint8 else x for x in xs]).to(self.device)

    # ---- per batch (on the model worker) -------------------------------------------------------------------------
    @torch.inference_mode()
    def classify(self, xs: Sequence[torch.Tensor]) -> List[np.ndarray]:
        """Inputs (C, H, W) → each one's class probabilities (K,), as `vitkit predict` computes them."""
        from ..io.checkpoint import check_finite_outputs
        from ..tasks.classify import classify_logits

        hook = self.cfg.extra.get("before_batch")
        if hook:
            hook("classify", len(xs))
        logits = classify_logits(self.fast, self.inputs(xs), *self.tta)
        check_finite_outputs(logits, "the served checkpoint", [f"request {i}" for i in range(len(xs))])
        return list(logits.softmax(-1).cpu().numpy())

    @torch.inference_mode()
    def embed(self, xs: Sequence[torch.Tensor]) -> List[np.ndarray]:
        """Inputs → L2-normalised embeddings (D,), with the index's pooling and layer (else `vitkit embed`'s)."""
        from ..io.checkpoint import check_finite_outputs
        from ..tasks.retrieve import embed_images

        v = embed_images(self.fast, self.inputs(xs), self.pool, self.layer)
        check_finite_outputs(v, "the served checkpoint", [f"request {i}" for i in range(len(xs))])
        return list(v.cpu().numpy())

    def explain(self, items: Sequence[tuple]) -> list:
        """(input, (method, head_fusion, discard_ratio)) pairs → per item (map (gh, gw), heads (h, gh, gw),
        logits (K,)), by `vitkit explain`'s function on the plain model; items with equal options run as one batch."""
        from ..tasks.explain import explain

        out: list = [None] * len(items)
        groups: dict = {}
        for i, (_, opts) in enumerate(items):
            groups.setdefault(opts, []).append(i)
        for (method, fusion, discard), idx in groups.items():
            x = self.inputs([items[i][0] for i in idx])
            e = explain(self.model, x, method, fusion, discard, max_tokens=0)
            for j, i in enumerate(idx):
                out[i] = (e, j)
        return out

    # ---- answers ---------------------------------------------------------------------------------------------
    def topk(self, probs: np.ndarray, k: int) -> dict:
        """`vitkit predict`'s entry for one image: best label and prob, and the top-k (probabilities rounded to 5)."""
        k = max(1, min(int(k), len(self.names)))
        p, idx = torch.from_numpy(np.asarray(probs)).topk(k)
        top = [{"label": self.names[i], "prob": round(q, 5)} for i, q in zip(idx.tolist(), p.tolist())]
        return {"label": top[0]["label"], "prob": top[0]["prob"], "topk": top}

    def explanation(self, x: torch.Tensor, result: tuple, images: bool = True) -> dict:
        """One explained image as JSON: `vitkit explain`'s scores (map and per-head maps over the patch grid,
        rounded to 6), its prediction, and PNGs (base64) of the input, the heat maps and their overlay."""
        from ..tasks.explain import upsample
        from ..data.inputs import denormalize

        e, j = result
        logits = e.logits[j].float()
        pred = int(logits.argmax()) if logits.numel() > 1 else None
        doc = {"method": e.method, **e.params, "grid": list(e.grid), "meaning": e.meaning,
               "predicted": self.names[pred] if pred is not None and pred < len(self.names) else pred,
               "peak": list(e.peaks()[j]), "map": e.map[j].numpy().round(6).tolist(),
               "heads": e.heads[j].numpy().round(6).tolist()}
        if not images:
            return doc
        if x.dtype == torch.uint8:
            x = self.scaling(x)
        img = denormalize(x, self.pcfg)  # (H, W, C) in [0, 1]
        H, W = img.shape[:2]
        scale = max(1, -(-DISPLAY // H))
        size = (H * scale, W * scale)
        base = np.repeat(np.repeat(img, scale, 0), scale, 1)
        base = np.repeat(base, 3, 2) if base.shape[2] == 1 else base
        heat = _colour(upsample(e.map[j], size))
        doc["image_png"] = _png(base)
        doc["heat_png"] = _png(heat)
        doc["overlay_png"] = _png(0.5 * base + 0.5 * heat)
        doc["head_pngs"] = [_png(_colour(upsample(h, size))) for h in e.heads[j]]
        return doc

    def thumbnail(self, i: int, size: int) -> bytes:
        """Index entry `i` (by id, never by a path from the request) read by vitkit's policy, shrunk to `size`,
        as PNG bytes."""
        from ..data import read_image

        if self.index is None or not 0 <= i < len(self.index):
            raise ServeError(404, "not_found", f"no image {i} in the index (ids are 0..{len(self.index or []) - 1})")
        try:
            im = read_image(self.index.paths[i], self.channels, draft_size=size)
        except (OSError, ValueError):
            raise ServeError(404, "not_found", f"image {i} of the index can no longer be read") from None
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    def neighbours(self, vecs: np.ndarray, k: int) -> List[List[dict]]:
        """`vitkit search`'s neighbours for query embeddings (Q, D), with the file's name instead of its path (the
        server's folders are not the client's business) and the URL of its thumbnail."""
        if self.index is None:
            raise ServeError(404, "no_index", "this server has no index; start it with --index INDEX_DIR")
        rows = self.index.neighbours(np.asarray(vecs, np.float32), k)
        return [[{"rank": n["rank"], "id": n["id"], "label": n["label"], "score": n["score"],
                  "name": Path(n["path"]).name, "image_url": f"/v1/images/{n['id']}",
                  "thumbnail_url": f"/v1/images/{n['id']}?size=96"} for n in row] for row in rows]


def _split_scaling(transform):
    """`eval_transform`'s Compose → (the pixel part: resize, crop, to uint8 tensor; the scaling part: to float and
    normalise), so requests decode to uint8 and a batch is scaled at once. A transform of another shape stays whole
    (the scaling part is then the identity)."""
    from torchvision.transforms import v2

    steps = list(getattr(transform, "transforms", []))
    if len(steps) >= 2 and isinstance(steps[-2], v2.ToDtype) and isinstance(steps[-1], v2.Normalize):
        return v2.Compose(steps[:-2]), v2.Compose(steps[-2:])
    return transform, (lambda x: x)


def training_card(given: Path, ckpt: Path) -> dict:
    """The model card's training figures, flat: from the checkpoint's own metadata (the run's compact report, which
    travels with a checkpoint copied anywhere, else the epoch and metrics every save records), completed by the run
    folder's report.json where the checkpoint sits in one (older checkpoints). `top1`/`top5` are the held-out figures
    of these weights; `latest_eval` is `vitkit eval`'s eval.json beside the checkpoint when it is about this file."""
    from ..errors import VitkitError
    from ..io.checkpoint import read_training

    try:
        rec = read_training(ckpt)
    except VitkitError:
        rec = {}
    source = "checkpoint" if rec else None
    folder = given if given.is_dir() else ckpt.parent
    r = _json(folder / "report.json")
    if isinstance(r, dict):
        mine = rec.get("epoch")  # the epoch of these weights: the report's evaluation is of its best epoch's
        from_report = {"run": r.get("name"), "epochs": r.get("epochs"), "steps": r.get("steps"),
                       "train_seconds": r.get("train_seconds"), "best_metric": r.get("best_metric") or None,
                       "best": r.get("best"), "best_epoch": r.get("best_epoch"),
                       "metrics": r.get("final") if isinstance(r.get("final"), dict) and
                       (mine is None or mine == r.get("epochs")) else None,
                       "eval": r.get("eval") if isinstance(r.get("eval"), dict) and
                       (mine is None or mine == r.get("best_epoch")) else None}
        rec = {**{k: v for k, v in from_report.items() if v is not None}, **rec}
        source = "run folder" if source is None else source + " and run folder"
    ev = rec.get("eval") or {}
    held = ev if "top1" in ev else rec.get("metrics") or {}  # the full evaluation, else the epoch's own
    card = {"source": source, "name": rec.get("run"), "epochs": rec.get("epochs", rec.get("epoch")),
            "steps": rec.get("steps"), "train_seconds": rec.get("train_seconds"),
            "best_metric": rec.get("best_metric"), "best": rec.get("best"), "top1": held.get("top1"),
            "top5": held.get("top5"), "eval_images": ev.get("num_images"), "data": rec.get("data"),
            "date": rec.get("date"), "vitkit_version": rec.get("vitkit_version"), "latest_eval": _latest_eval(
                folder, ckpt)}
    return {k: v for k, v in card.items() if v is not None}


def _latest_eval(folder: Path, ckpt: Path) -> Optional[dict]:
    """eval.json (`vitkit eval`) beside the checkpoint, when it evaluated this file (by name, or the run folder
    whose best it is): its data, top-1/top-5, image count, precision and when it ran."""
    import datetime

    doc = _json(folder / "eval.json")
    if not isinstance(doc, dict) or "top1" not in doc:
        return None
    from ..io.checkpoint import RUN_CHECKPOINTS

    named = Path(str(doc.get("checkpoint", ""))).name
    folder_loads = next((n for n in RUN_CHECKPOINTS if (ckpt.parent / n).is_file()), None)
    if named != ckpt.name and not (named == ckpt.parent.name and folder_loads == ckpt.name):
        return None
    when = datetime.datetime.fromtimestamp((folder / "eval.json").stat().st_mtime, datetime.timezone.utc)
    return {"data": doc.get("data"), "top1": doc.get("top1"), "top5": doc.get("top5"),
            "num_images": doc.get("num_images"), "precision": doc.get("precision"),
            "date": when.isoformat(timespec="seconds")}


def _json(path: Path):
    """A JSON file's content, or None when it is missing or unreadable (the card then leaves it out)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _colour(m: np.ndarray) -> np.ndarray:
    """A map in [0, 1] (H, W) → RGB (H, W, 3) in [0, 1] by matplotlib's 'jet', as `vitkit explain` draws it."""
    from matplotlib import colormaps

    return colormaps["jet"](m)[..., :3]


def _png(rgb: np.ndarray) -> str:
    """(H, W, 3) floats in [0, 1] → a base64 PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), "RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


__all__ = ["Service", "EXPLAIN_METHODS", "HEAD_FUSIONS"]
