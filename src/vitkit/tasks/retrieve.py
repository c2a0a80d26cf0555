"""Image retrieval with a trained ViT: embed images, index the embeddings with faiss, search, and measure.

- `embed_images`: images (B, C, H, W) → L2-normalised embeddings (B, D): the class token, the mean of the patch
  tokens, or the pre-logits feature, from the last block (after the final norm) or an earlier one (`layer`).
- `embed_folder`: a folder of images → an embeddings file (safetensors), re-embedding only new or changed files
  (keyed by path, mtime and size) when the file exists already.
- `Index`: a faiss index (exact inner product, IVF or HNSW) with a manifest of paths, labels and the model that
  made the embeddings, so a query embedded by another model is refused.
- `recall_at_k`, `map_at_r`, `knn_classify`: retrieval metrics and DINO's weighted k-NN classifier.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..data import eval_transform, list_images
from ..errors import CheckpointError, ConfigError, DataError
from ..io.checkpoint import atomic_write, load_vit
from ..io.files import lock_file, write_pid
from ..models import Preprocessing
from ..train.distributed import broadcast_obj, gather_obj, rank_range, setup_distributed
from ..models.fast import precision_record
from ..data.inputs import label_of, open_image

log = logging.getLogger(__name__)

POOLS = ("cls", "mean", "prelogits")
INDEX_KINDS = ("flat", "ivf", "hnsw")
EMBEDDINGS_FORMAT = "vitkit-embeddings"
GRID_DPI = 100  # the search grid's resolution; its thumbnails are downscaled to twice what it shows
INDEX_FORMAT = "vitkit-index"


def _faiss():
    """faiss, imported quietly (its loader logs each CPU-feature probe at INFO)."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError:
        raise ConfigError("retrieval needs faiss: pip install 'vitkit[retrieval]'") from None

    return faiss


@contextlib.contextmanager
def writer_lock(target):
    """Hold an exclusive lock on `target` (an embeddings file or an index folder) while it is read, changed and
    written back. A second writer waits its turn (it logs the pid it waits for), so neither loses the other's work;
    the lock is an fcntl.flock on `.<name>.lock` beside the target, which the OS drops when its process dies, so a
    killed writer never leaves it stuck. (Where fcntl does not exist, e.g. Windows, writers are not serialised.)"""
    target = Path(target)
    fd = lock_file(target.absolute().parent / f".{target.name}.lock", wait=True, what=str(target))
    try:
        if fd is not None:
            write_pid(fd)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock


# ---- embeddings ------------------------------------------------------------------------------------------------
def default_pool(model, layer: Optional[int] = None) -> str:
    """The feature the model's head reads: pre-logits (the normed class token, as DINO's k-NN uses it, or the
    fc-normed mean of the patch tokens for an average-pool model); for an earlier `layer`, the class token of a
    class-token model, else the mean of the patch tokens."""
    if layer is None:
        return "prelogits"
    return "cls" if model.has_class_token and model.global_pool == "token" else "mean"


def _check_pool(model, pool: str, layer: Optional[int]) -> None:
    if pool not in POOLS:
        raise ConfigError(f"pool must be one of {POOLS}, got {pool!r}")
    if pool == "cls" and not model.has_class_token:
        raise ConfigError("this model has no class token (global_pool='avg'); use pool 'mean' or 'prelogits'")
    if pool == "prelogits" and layer is not None:
        raise ConfigError("pre-logits is the pooled feature of the last block; use pool 'cls' or 'mean' with a layer")
    if layer is not None and not -len(model.blocks) <= layer < len(model.blocks):
        raise ConfigError(f"layer {layer} is out of range for a model of {len(model.blocks)} blocks "
                          f"(use 0..{len(model.blocks) - 1}, or negative from the end)")


@torch.no_grad()
def embed_images(model, x: torch.Tensor, pool: str = "cls", layer: Optional[int] = None) -> torch.Tensor:
    """Images (B, C, H, W) → L2-normalised embeddings (B, D). `layer` picks an earlier block's output (0-based,
    negative from the end); its tokens go through the model's final norm, as the last block's do."""
    _check_pool(model, pool, layer)
    if pool == "prelogits":
        fused = getattr(model, "embed_images", None)  # an optimized model runs its own fast path
        f = fused(x) if fused is not None else model.forward_head(model.forward_features(x), pre_logits=True)
    else:
        if layer is None:
            tokens = model.forward_features(x)
        else:
            stop = layer % len(model.blocks)
            tokens = model.embed(x)
            for blk in model.blocks[: stop + 1]:
                tokens = blk(tokens)
            tokens = model.norm(tokens)
        f = tokens[:, 0] if pool == "cls" else tokens[:, model.num_prefix_tokens:].mean(dim=1)
    return F.normalize(f.float(), dim=-1)


def resolve_checkpoint(path) -> Path:
    """A checkpoint file, or the best/last/model checkpoint of a run folder (as `vitkit.load` picks it)."""
    path = Path(path)
    if path.is_dir():
        for cand in ("best.safetensors", "last.safetensors", "model.safetensors"):
            if (path / cand).is_file():
                return path / cand
    return path


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_manifest(model, checkpoint=None, pool: str = "cls", layer: Optional[int] = None) -> dict:
    """What identifies the embedding space: the checkpoint's hash (or, for an in-memory model, a hash of its
    weights), its config, the pooling, the layer and the input size. Two embeddings compare only if these agree."""
    if checkpoint is not None:
        ckpt = resolve_checkpoint(checkpoint)
        digest = file_sha256(ckpt)
        where = str(ckpt.resolve())
    else:
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        digest, where = "weights:" + h.hexdigest(), None
    return {"checkpoint": where, "sha256": digest, "config": model.config.to_dict(), "pool": pool,
            "layer": layer, "input_size": list(Preprocessing.of(model).input_size)}


def same_model(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("sha256", "pool", "layer", "input_size"))


def _describe(m: dict) -> str:
    return (f"{m.get('checkpoint') or 'in-memory model'} (sha256 {str(m.get('sha256'))[:12]}, pool {m.get('pool')}, "
            f"layer {m.get('layer')}, input {m.get('input_size')})")


def check_same_model(index_model: dict, query_model: dict, what: str = "this index") -> None:
    if not same_model(index_model, query_model):
        raise CheckpointError(f"{what} was built with the embeddings of {_describe(index_model)}, but the queries "
                              f"come from {_describe(query_model)}; embeddings of different models do not compare: "
                              "use the index's own model or rebuild the index with this one")


class Embeddings:
    """L2-normalised embeddings (N, D) with their image paths, labels, file keys (mtime, size) and model."""

    def __init__(self, vectors: np.ndarray, paths: List[str], labels: List[Optional[str]], keys: List[list],
                 model: dict, root: Optional[str] = None):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.paths, self.labels, self.keys, self.model, self.root = list(paths), list(labels), list(keys), model, root

    def __len__(self) -> int:
        return len(self.paths)

    def save(self, path) -> Path:
        from safetensors.numpy import save_file

        meta = {"format": EMBEDDINGS_FORMAT, "model": json.dumps(self.model), "root": json.dumps(self.root),
                "paths": json.dumps(self.paths), "labels": json.dumps(self.labels), "keys": json.dumps(self.keys)}
        path = Path(path)
        atomic_write(path, lambda tmp: save_file({"embeddings": self.vectors}, tmp, metadata=meta))
        return path

    @classmethod
    def load(cls, path) -> "Embeddings":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise DataError(f"embeddings file {str(path)!r} does not exist; make it with `vitkit embed`")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = dict(f.metadata() or {})
                if meta.get("format") != EMBEDDINGS_FORMAT:
                    raise DataError(f"{str(path)!r} is not a vitkit embeddings file; make one with `vitkit embed`")
                vectors = f.get_tensor("embeddings")
            return cls(vectors, json.loads(meta["paths"]), json.loads(meta["labels"]), json.loads(meta["keys"]),
                       json.loads(meta["model"]), json.loads(meta.get("root", "null")))
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{str(path)!r} is not a readable vitkit embeddings file "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); re-create it with "
                            "`vitkit embed`") from None


def _file_key(p: Path) -> list:
    st = p.stat()
    return [st.st_mtime_ns, st.st_size]


def embed_paths(model, paths: Sequence, pool: str, layer: Optional[int], batch_size: int = 64,
                progress: bool = True, strict: bool = True,
                source: str = "the model") -> Tuple[np.ndarray, List[Tuple[int, str]]]:
    """Image files → (N, D) float32 embeddings, batched, with a progress bar (images/s and ETA). Unreadable files
    stop the run when `strict`, else they are left out: returns the embeddings of the readable files in order and
    the (position, reason) of the others. NaN or infinite embeddings are a CheckpointError naming `source`."""
    from tqdm import tqdm

    from ..io.checkpoint import check_finite_outputs

    tf = eval_transform(Preprocessing.of(model))
    out, bad = [], []
    with tqdm(total=len(paths), desc="embed", unit="img", disable=not progress, leave=False) as bar:
        for i in range(0, len(paths), batch_size):
            xs, ok = [], []
            for j, p in enumerate(paths[i: i + batch_size]):
                try:
                    xs.append(tf(open_image(p, model.config.in_chans)))
                    ok.append(p)
                except DataError as e:
                    if strict:
                        raise
                    bad.append((i + j, str(e)))
            if xs:
                vecs = embed_images(model, torch.stack(xs), pool, layer)
                check_finite_outputs(vecs, source, ok)
                out.append(vecs.numpy())
            bar.update(len(paths[i: i + batch_size]))
    return (np.concatenate(out) if out else np.zeros((0, model.embed_dim), np.float32)), bad


def embed_folder(checkpoint, folder, out, pool: Optional[str] = None, layer: Optional[int] = None,
                 batch_size: int = 64, overwrite: bool = False, progress: bool = True, model=None,
                 strict: bool = False, fast: bool = False, precision: str = "auto") -> Dict:
    """Embed every image under `folder` into the embeddings file `out`. When `out` exists (same model), only the
    new or changed files (by path, mtime and size) are embedded; removed files are dropped. Unreadable images are
    skipped with a warning (`strict`: stop at the first). Returns counts. Under torchrun (WORLD_SIZE > 1) every
    process calls it: each embeds a contiguous part and rank 0 writes the file a single process would. `fast`:
    vitkit.optimize in `precision` ("auto": the fastest whose embeddings agree with fp32's on the first batch); the
    manifest records the precision."""
    from .. import validate as v

    v.integer(batch_size, "batch_size", lo=1)
    v.integer(layer, "layer", optional=True)

    folder = Path(folder)
    files = list_images(folder)
    if model is None:
        model = load_vit(checkpoint, "embed")  # an MAE: its encoder
    model.eval()
    pool = pool or default_pool(model, layer)
    _check_pool(model, pool, layer)
    manifest = model_manifest(model, checkpoint, pool, layer)
    if fast and layer is None:  # vitkit.optimize: the same embeddings in fp32, within TOLERANCES otherwise
        from ..models.fast import optimize

        model = optimize(model, precision=precision)
    out = Path(out)
    dist = setup_distributed("cpu")  # under torchrun: each process embeds its part, rank 0 writes the file
    if dist.world > 1:
        return _embed_distributed(dist, out, model, manifest, folder, files, pool, layer, batch_size, overwrite,
                                  progress, strict)
    with writer_lock(out):  # read, embed and write back as one step: a concurrent embed waits, nothing is lost
        return _embed_into(out, model, manifest, folder, files, pool, layer, batch_size, overwrite, progress, strict)


def _vectors_precision(old: Optional["Embeddings"], model, reused: int, new: int) -> dict:
    """The manifest's precision entry for a file of `reused` vectors from `old` and `new` ones from `model`: one
    precision, or 'mixed' (with a warning) when an update embeds in another precision than the file holds."""
    rec = precision_record(model)
    if old is None or not reused:
        return rec
    kept = {k: v for k, v in (old.model or {}).items() if k.startswith("precision")} or {"precision": "fp32"}
    if not new or kept["precision"] == rec["precision"]:
        return kept
    log.warning("the embeddings file holds %s vectors; these %d new ones are %s: the file is now of mixed "
                "precision (embed again with --overwrite and one --precision to make it uniform)",
                kept["precision"], new, rec["precision"])
    return {"precision": "mixed",
            "precisions": sorted({*kept.get("precisions", [kept["precision"]]), rec["precision"]})}


class _EmbedPlan:
    """What an embeddings file lacks for a folder: its files' resolved paths and keys, the old file's vectors by
    path (`have`) and the positions still to embed (`todo`)."""

    def __init__(self, out: Path, manifest: dict, folder: Path, files: List[Path], overwrite: bool):
        old = None
        if out.exists():
            try:
                old = Embeddings.load(out)
            except DataError:
                if not overwrite:
                    raise DataError(f"{str(out)!r} exists and is not a vitkit embeddings file; pass --overwrite to "
                                    "replace it, or pick another --out") from None
            if old is not None and not same_model(old.model, manifest):
                if not overwrite:
                    raise CheckpointError(f"{str(out)!r} holds embeddings of {_describe(old.model)}, not of "
                                          f"{_describe(manifest)}; pass --overwrite to replace them, or pick another "
                                          "--out")
                old = None
            root = str(folder.resolve())
            if old is not None and old.root is not None and old.root != root:
                if not overwrite:
                    raise FileExistsError(f"{str(out)!r} holds the embeddings of folder {old.root!r}, not of "
                                          f"{root!r}; pass --overwrite to replace them, or pick another --out")
                old = None
        self.old = old
        self.have = {p: (k, i) for i, (p, k) in enumerate(zip(old.paths, old.keys))} if old is not None else {}
        self.paths = [str(p.resolve()) for p in files]
        self.keys = [_file_key(p) for p in files]
        self.todo = [i for i, (p, k) in enumerate(zip(self.paths, self.keys))
                     if p not in self.have or self.have[p][0] != k]

    def save(self, out: Path, dim: int, manifest: dict, folder: Path, files: List[Path], new: np.ndarray,
             bad: List[Tuple[int, str]], pool: str, layer: Optional[int]) -> Dict:
        """Write the embeddings file from the reused vectors and `new` (the readable `todo` files' vectors, in order;
        `bad`: (position in the folder, reason) of the unreadable ones). Returns the counts."""
        paths, todo = self.paths, self.todo
        vectors = np.zeros((len(paths), dim), np.float32)
        todo_set = set(todo)
        for i, p in enumerate(paths):
            if i not in todo_set:
                vectors[i] = self.old.vectors[self.have[p][1]]
        bad_set = {i for i, _ in bad}
        vectors[[i for i in todo if i not in bad_set]] = new
        if bad:
            if len(bad) == len(paths):
                raise DataError(f"none of the {len(paths)} image files under {str(folder)!r} could be read; the "
                                f"first: {bad[0][1]}")
            for _, why in bad:
                log.warning("skipped: %s", why)
        keep = sorted(set(range(len(paths))) - bad_set)
        labels = [label_of(p, folder) for p in files]
        Embeddings(vectors[keep], [paths[i] for i in keep], [labels[i] for i in keep],
                   [self.keys[i] for i in keep], manifest, str(folder.resolve())).save(out)
        removed = len(set(self.have) - set(paths))
        return {"out": str(out), "images": len(keep), "embedded": len(todo) - len(bad),
                "reused": len(paths) - len(todo), "removed": removed, "skipped": [paths[i] for i, _ in bad],
                "dim": int(dim), "pool": pool, "layer": layer}


def _embed_into(out: Path, model, manifest: dict, folder: Path, files: List[Path], pool: str, layer: Optional[int],
                batch_size: int, overwrite: bool, progress: bool, strict: bool) -> Dict:
    """embed_folder's work under the lock: reuse what `out` holds for this model and folder, embed the rest."""
    plan = _EmbedPlan(out, manifest, folder, files, overwrite)
    new, bad = _embed_part(model, manifest, files, plan.todo, pool, layer, batch_size, progress, strict)
    manifest = dict(manifest, **_vectors_precision(plan.old, model, len(plan.paths) - len(plan.todo), len(plan.todo)))
    return plan.save(out, model.embed_dim, manifest, folder, files, new, bad, pool, layer)


def _embed_part(model, manifest: dict, files: List[Path], todo: Sequence[int], pool: str, layer: Optional[int],
                batch_size: int, progress: bool, strict: bool) -> Tuple[np.ndarray, List[Tuple[int, str]]]:
    """The embeddings of files[todo] (the readable ones, in order) and (position in `files`, reason) of the others."""
    if not todo:
        return np.zeros((0, model.embed_dim), np.float32), []
    new, bad_local = embed_paths(model, [files[i] for i in todo], pool, layer, batch_size, progress, strict,
                                 source=str(manifest.get("checkpoint") or "the model"))
    return new, [(todo[j], why) for j, why in bad_local]


def _embed_distributed(dist, out: Path, model, manifest: dict, folder: Path, files: List[Path], pool: str,
                       layer: Optional[int], batch_size: int, overwrite: bool, progress: bool, strict: bool) -> Dict:
    """embed_folder under torchrun: rank 0 holds the lock and decides what to embed; each process embeds its
    contiguous part of that (`rank_range`); rank 0 gathers the parts in rank order and writes the file, so it is the
    one a single process writes. An error anywhere (a bad file with `strict`, an --out of another model) is raised
    on every process, so none waits for the others forever."""
    with writer_lock(out) if dist.is_main else contextlib.nullcontext():
        plan = None
        try:
            plan = _EmbedPlan(out, manifest, folder, files, overwrite) if dist.is_main else None
            todo = plan.todo if plan is not None else None
        except Exception as e:  # noqa: BLE001 - sent to every process, raised everywhere below
            todo = e
        todo = broadcast_obj(todo, dist)
        if isinstance(todo, BaseException):
            raise todo
        lo, hi = rank_range(len(todo), dist)
        try:
            part = _embed_part(model, manifest, files, todo[lo:hi], pool, layer, batch_size,
                               progress and dist.is_main, strict)
        except Exception as e:  # noqa: BLE001 - as above
            part = e
        parts = gather_obj(part, dist)
        result = None
        if dist.is_main:
            errors = [p for p in parts if isinstance(p, BaseException)]
            try:
                if errors:
                    raise errors[0]
                new = np.concatenate([p[0] for p in parts])
                manifest = dict(manifest, **_vectors_precision(plan.old, model, len(plan.paths) - len(plan.todo),
                                                               len(plan.todo)))
                result = plan.save(out, model.embed_dim, manifest, folder, files, new, [b for p in parts for b in p[1]],
                                   pool, layer)
            except Exception as e:  # noqa: BLE001 - as above
                result = e
        result = broadcast_obj(result, dist)
    if isinstance(result, BaseException):
        raise result
    return result


# ---- the index ---------------------------------------------------------------------------------------------------
IVFDATA = "index.ivfdata"  # a merged on-disk index's inverted lists, beside its index.faiss


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (inner product = cosine); zero rows stay zero."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _ivf_training_plan(n: int, nlist: Optional[int]) -> Tuple[int, Optional[np.ndarray]]:
    """(cells, the positions of the training sample among n vectors, or None for all of them). faiss wants >= 39
    training points per cell and 4·sqrt(N) cells is its rule of thumb; k-means on 64 points per cell is plenty for
    the cells' job (routing queries) and keeps training short. Seeded: the same n gives the same sample."""
    nlist = nlist or int(max(1, min(4 * np.sqrt(n), n // 39)))
    if n < nlist:
        raise DataError(f"an IVF index with {nlist} cells needs at least {nlist} vectors to train on, got {n}; "
                        "add more vectors at once, lower --nlist, or use --kind flat")
    return nlist, None if n <= 64 * nlist else np.random.default_rng(0).choice(n, 64 * nlist, replace=False)


def _trained_ivf(dim: int, nlist: int, train: np.ndarray):
    """An empty inner-product IVF-flat index whose `nlist` cells are trained (k-means) on the unit rows `train`."""
    faiss = _faiss()

    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(train, dtype=np.float32))
    return index


@contextlib.contextmanager
def _faiss_prints_to_stderr():
    """faiss's on-disk inverted lists report with printf on stdout ('resizing ...', 'updating ondisk filename ...');
    send them to stderr while faiss works, so the JSON the CLI prints on stdout stays parseable."""
    import ctypes
    import sys

    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout at all: nothing to protect
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        ctypes.CDLL(None).fflush(None)  # what C buffered goes out to stderr, before stdout is put back
        os.dup2(saved, 1)
        os.close(saved)


class Index:
    """A faiss inner-product index over L2-normalised embeddings (so scores are cosine similarities), with the
    paths/labels of its entries and the model that made them.

    kind 'flat' is exact; 'ivf' (inverted lists, `nlist` k-means cells, `nprobe` of them searched) and 'hnsw'
    (a navigable small-world graph with `M` links, `ef_search` candidates) are approximate and fast at scale.
    """

    def __init__(self, dim: int, kind: str = "flat", model: Optional[dict] = None, nlist: Optional[int] = None,
                 nprobe: int = 16, M: int = 32, ef_search: int = 64, ef_construction: int = 80):
        faiss = _faiss()

        if kind not in INDEX_KINDS:
            raise ConfigError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
        from .. import validate as v

        v.integer(nlist, "nlist", lo=1, optional=True)
        v.integer(M, "M", lo=2)
        for name, val in (("nprobe", nprobe), ("ef_search", ef_search), ("ef_construction", ef_construction)):
            v.integer(val, name, lo=1)
        v.integer(dim, "dim", lo=1)
        self.dim, self.kind, self.model = int(dim), kind, model
        self.params = {"nlist": nlist, "nprobe": int(nprobe), "M": int(M), "ef_search": int(ef_search),
                       "ef_construction": int(ef_construction)}
        self.paths: List[Optional[str]] = []
        self.labels: List[Optional[str]] = []
        self.storage = "memory"  # 'ondisk': merged inverted lists in index.ivfdata; 'mmap': opened memory-mapped
        if kind == "flat":
            self.index = faiss.IndexFlatIP(self.dim)
        elif kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(self.dim, int(M), faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = int(ef_construction)
            self.index.hnsw.efSearch = int(ef_search)
        else:
            self.index = None  # IVF: built on the first add, when the data to train its cells is there

    def __len__(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def _make_ivf(self, x: np.ndarray) -> None:
        nlist, sample = _ivf_training_plan(len(x), self.params["nlist"])
        self.index = _trained_ivf(self.dim, nlist, x if sample is None else x[sample])
        self.index.nprobe = min(self.params["nprobe"], nlist)
        self.params["nlist"] = nlist

    def add(self, vectors, paths: Optional[Sequence[str]] = None, labels: Optional[Sequence] = None,
            model: Optional[dict] = None) -> "Index":
        """Append (N, D) embeddings (normalised here), with their paths and labels. `model` (a manifest) must
        match the index's model when both are known."""
        if self.storage != "memory":
            raise DataError(f"this index is {'merged on disk' if self.storage == 'ondisk' else 'memory-mapped'} and "
                            "read-only; build a new one with `vitkit index build` from all the embeddings files (or "
                            "load it without mmap)")
        x = np.ascontiguousarray(torch.as_tensor(vectors).float().numpy() if torch.is_tensor(vectors) else vectors,
                                 dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise DataError(f"expected embeddings of shape (N, {self.dim}), got {tuple(x.shape)}; they come from "
                            "another model or layer than this index's")
        if model is not None:
            if self.model is None:
                self.model = model
            else:
                check_same_model(self.model, model)
                mine, theirs = self.model.get("precision", "fp32"), model.get("precision", "fp32")
                if mine != theirs:  # vectors of two precisions: searchable, but say so in the manifest
                    log.warning("adding %s embeddings to an index of %s ones: the index is now of mixed precision",
                                theirs, mine)
                    self.model = dict(self.model, precision="mixed")
        x = _unit(x)
        if paths is not None and len(paths) != len(x):
            raise DataError(f"got {len(x)} embeddings but {len(paths)} paths")
        if self.index is None:
            self._make_ivf(x)
        self.index.add(x)
        self.paths += list(paths) if paths is not None else [None] * len(x)
        self.labels += list(labels) if labels is not None else [None] * len(x)
        return self

    def search(self, queries, k: int = 10) -> Tuple[np.ndarray, np.ndarray]:
        """(Q, D) queries → (scores (Q, k'), ids (Q, k')) with k' = min(k, entries), best first; id -1 where an
        approximate index finds fewer."""
        from .. import validate as v

        k = v.integer(k, "k", lo=1)
        if len(self) == 0:
            raise DataError("the index is empty; add embeddings before searching")
        q = np.ascontiguousarray(torch.as_tensor(queries).float().numpy() if torch.is_tensor(queries) else queries,
                                 dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.shape[1] != self.dim:
            raise DataError(f"queries have dimension {q.shape[1]}, the index {self.dim}; they come from another "
                            "model or layer than this index's")
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        return self.index.search(q, min(k, len(self)))  # no more columns than entries (a huge k costs nothing)

    def neighbours(self, queries, k: int = 10) -> List[List[dict]]:
        """Per query, the k nearest entries as {rank, id, path, label, score}."""
        scores, ids = self.search(queries, k)
        return [[{"rank": r + 1, "id": int(i), "path": self.paths[i], "label": self.labels[i], "score": float(s)}
                 for r, (s, i) in enumerate(zip(srow, irow)) if i >= 0] for srow, irow in zip(scores, ids)]

    def manifest(self) -> dict:
        m = {"format": INDEX_FORMAT, "kind": self.kind, "dim": self.dim, "count": len(self),
             "params": self.params, "model": self.model, "paths": self.paths, "labels": self.labels}
        if self.storage == "ondisk":  # only then: an in-memory index's manifest is the one vitkit 0.1.0 wrote
            m["storage"] = "ondisk"
        return m

    def save(self, path) -> Path:
        """A folder with `index.faiss` and `manifest.json` (each written atomically; the manifest's count ties
        them together)."""
        faiss = _faiss()

        if self.index is None:
            raise DataError("cannot save an IVF index that has no vectors yet")
        if self.storage != "memory":
            raise DataError("an on-disk or memory-mapped index is saved where it was built; load it without mmap to "
                            "save a copy")
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise DataError(f"{str(path)!r} is a file; an index is saved as a folder, pick another --out")
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / "index.faiss", lambda tmp: faiss.write_index(self.index, tmp))
        atomic_write(path / "manifest.json", lambda tmp: Path(tmp).write_text(json.dumps(self.manifest())))
        return path

    @classmethod
    def load(cls, path, mmap: bool = False) -> "Index":
        """An index folder. `mmap`: map index.faiss into memory instead of reading it (the OS pages in what searches
        touch: fast to open, shared between processes, more than RAM). A merged on-disk index (`build_index_folder`
        of several files) is always opened so: its inverted lists stay in index.ivfdata beside it."""
        faiss = _faiss()

        path = Path(path)
        mpath, ipath = path / "manifest.json", path / "index.faiss"
        if not mpath.is_file() or not ipath.is_file():
            raise DataError(f"{str(path)!r} is not a vitkit index (expected a folder with manifest.json and "
                            "index.faiss); build one with `vitkit index build`")
        try:
            m = json.loads(mpath.read_text())
            assert isinstance(m, dict) and m.get("format") == INDEX_FORMAT
            p, paths, labels = m["params"], m["paths"], m["labels"]
            assert isinstance(p, dict) and isinstance(paths, list) and isinstance(labels, list)
            assert m["model"] is None or isinstance(m["model"], dict)
            self = cls(m["dim"], m["kind"], m["model"], p.get("nlist"), p["nprobe"], p["M"], p["ef_search"],
                       p["ef_construction"])
        except Exception as e:
            why = f" ({e})" if isinstance(e, ConfigError) else ""
            raise DataError(f"{str(mpath)!r} is not a vitkit index manifest{why}; rebuild the index") from None
        flags = 0
        if m.get("storage") == "ondisk":
            if not (path / IVFDATA).is_file():
                raise DataError(f"{str(path)!r} is an on-disk index but {IVFDATA} is missing beside index.faiss; copy "
                                "the whole folder, or rebuild the index")
            self.storage, flags = "ondisk", faiss.IO_FLAG_ONDISK_SAME_DIR  # the lists: IVFDATA in the same folder
        elif mmap:
            # IVF: its inverted lists mapped; flat and HNSW: their stored vectors (IndexFlatCodes) mapped. The two
            # flags do not combine (an IVF read with MMAP_IFC fails).
            self.storage = "mmap"
            flags = faiss.IO_FLAG_MMAP if self.kind == "ivf" else getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP)
        try:
            with _faiss_prints_to_stderr():
                self.index = faiss.read_index(str(ipath), flags)
        except Exception as e:
            raise DataError(f"{str(ipath)!r} cannot be read ({str(e).splitlines()[0]}); rebuild the index") from None
        want = {"flat": faiss.IndexFlat, "hnsw": faiss.IndexHNSW, "ivf": faiss.IndexIVF}[self.kind]
        if not isinstance(self.index, want):
            raise DataError(f"{str(path)!r}: index.faiss is a {type(self.index).__name__}, not the {self.kind} index "
                            "the manifest names; the folder was damaged: rebuild the index")
        if self.index.d != self.dim:  # searching with the wrong width would read past the vectors
            raise DataError(f"{str(path)!r}: index.faiss holds {self.index.d}-dimensional vectors but the manifest "
                            f"says {self.dim}; the folder was damaged: rebuild the index")
        self.paths, self.labels = paths, labels
        if self.index.ntotal != len(self.paths) or self.index.ntotal != m["count"] or len(labels) != len(paths):
            raise DataError(f"{str(path)!r}: index.faiss holds {self.index.ntotal} vectors but the manifest lists "
                            f"{len(self.paths)}; the folder was damaged (interrupted write?): rebuild the index")
        return self

    def set_search_params(self, nprobe: Optional[int] = None, ef_search: Optional[int] = None) -> None:
        from .. import validate as v

        v.integer(nprobe, "nprobe", lo=1, optional=True)
        v.integer(ef_search, "ef_search", lo=1, optional=True)
        if nprobe is not None and self.kind == "ivf":
            self.params["nprobe"] = int(nprobe)
            self.index.nprobe = int(nprobe)
        if ef_search is not None and self.kind == "hnsw":
            self.params["ef_search"] = int(ef_search)
            self.index.hnsw.efSearch = int(ef_search)

    def add_new(self, embeddings: "Embeddings") -> int:
        """Append the embeddings whose paths the index does not hold yet (same model only); returns how many."""
        have = set(self.paths)
        new = [i for i, p in enumerate(embeddings.paths) if p not in have]
        if new:
            self.add(embeddings.vectors[new], [embeddings.paths[i] for i in new], [embeddings.labels[i] for i in new],
                     model=embeddings.model)
        else:
            self.add(embeddings.vectors[:0], [], [], model=embeddings.model)  # still refuses another model's
        return len(new)


def build_index(embeddings: Embeddings, kind: str = "flat", **params) -> Index:
    return Index(embeddings.vectors.shape[1], kind, embeddings.model, **params).add(
        embeddings.vectors, embeddings.paths, embeddings.labels)


# ---- metrics -----------------------------------------------------------------------------------------------------
def _topk(query: torch.Tensor, db: torch.Tensor, k: int, chunk: int = 1024) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities of L2-normalised (Q, D) against (M, D): the top k (Q, k) values and indices."""
    vals, idx = [], []
    for i in range(0, len(query), chunk):
        s = query[i: i + chunk] @ db.T
        v, j = s.topk(min(k, db.shape[0]), dim=1)
        vals.append(v)
        idx.append(j)
    return torch.cat(vals), torch.cat(idx)


def _as_labels(labels) -> torch.Tensor:
    if torch.is_tensor(labels):
        return labels.long()
    labels = list(labels)
    if labels and not isinstance(labels[0], (int, np.integer)):
        names = {n: i for i, n in enumerate(sorted(set(map(str, labels))))}
        return torch.tensor([names[str(x)] for x in labels])
    return torch.as_tensor(np.asarray(labels, dtype=np.int64))


def recall_at_k(query, query_labels, db, db_labels, ks=(1, 5, 10)) -> Dict[str, float]:
    """Recall@k as metric learning reports it: the fraction of queries with at least one same-class item among
    their k nearest database items."""
    q, d = torch.as_tensor(query).float(), torch.as_tensor(db).float()
    ql, dl = _as_labels(query_labels), _as_labels(db_labels)
    _, idx = _topk(q, d, max(ks))
    hit = dl[idx] == ql[:, None]
    return {f"recall@{k}": float(hit[:, :k].any(dim=1).float().mean()) for k in ks}


def map_at_r(query, query_labels, db, db_labels) -> float:
    """mAP@R (Musgrave et al. 2020, "A Metric Learning Reality Check"): per query, R = the number of database items
    of its class; AP@R = (1/R) Σ_{i≤R} P(i)·rel(i) over its R nearest items; averaged over queries."""
    q, d = torch.as_tensor(query).float(), torch.as_tensor(db).float()
    ql, dl = _as_labels(query_labels), _as_labels(db_labels)
    R = (dl[None, :] == ql[:, None]).sum(dim=1)
    Rmax = int(R.max())
    if Rmax == 0:
        return 0.0
    _, idx = _topk(q, d, Rmax)
    rel = (dl[idx] == ql[:, None]).float()  # (Q, Rmax)
    ranks = torch.arange(1, rel.shape[1] + 1, dtype=torch.float32)
    within = ranks[None, :] <= R[:, None]
    rel = rel * within
    precision = rel.cumsum(dim=1) / ranks[None, :]
    ap = (precision * rel).sum(dim=1) / R.clamp(min=1)
    return float(ap[R > 0].mean())


def knn_classify(query, db, db_labels, k: int = 20, temperature: float = 0.07,
                 num_classes: Optional[int] = None) -> torch.Tensor:
    """DINO's weighted k-NN classifier (Caron et al. 2021, `eval_knn.py`): each of the k nearest database items
    votes for its class with weight exp(cosine / T); the class with the largest total wins. Returns (Q,) labels."""
    q, d = torch.as_tensor(query).float(), torch.as_tensor(db).float()
    dl = _as_labels(db_labels)
    c = int(num_classes or int(dl.max()) + 1)
    sims, idx = _topk(q, d, k)
    weights = (sims / temperature).exp()
    votes = torch.zeros(len(q), c).scatter_add_(1, dl[idx], weights)
    return votes.argmax(dim=1)


def retrieval_report(query, query_labels, db, db_labels, ks=(1, 5, 10), knn_k: int = 20,
                     temperature: float = 0.07) -> Dict[str, float]:
    """Recall@k, mAP@R and weighted k-NN accuracy, with the test split as queries and the train split as database."""
    ql = _as_labels(query_labels)
    out = recall_at_k(query, ql, db, db_labels, ks)
    out["map@r"] = map_at_r(query, ql, db, db_labels)
    pred = knn_classify(query, db, db_labels, knn_k, temperature, num_classes=int(max(_as_labels(db_labels).max(),
                                                                                            ql.max())) + 1)
    out[f"knn{knn_k}_acc"] = float((pred == ql).float().mean())
    out["queries"], out["database"] = int(len(ql)), int(len(db))
    return out


@torch.no_grad()
def embed_dataset(model, dataset, pool: str, layer: Optional[int], batch_size: int = 256,
                  progress: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """A `vitkit.data` dataset (eval transform) → its embeddings (N, D) and labels (N,), in order."""
    from tqdm import tqdm

    from ..data import make_loader

    loader = make_loader(dataset, batch_size, train=False)
    embs, labels = [], []
    for x, y in tqdm(loader, desc="embed", unit="batch", disable=not progress, leave=False):
        embs.append(embed_images(model, x, pool, layer))
        labels.append(y)
    return torch.cat(embs), torch.cat(labels)


def evaluate_retrieval(checkpoint, data: str, *, pool: Optional[str] = None, layer: Optional[int] = None,
                       batch_size: int = 256, knn_k: int = 20, temperature: float = 0.07, data_dir="data",
                       download: bool = False, max_train: Optional[int] = None, max_val: Optional[int] = None,
                       progress: bool = True, model=None, out=None, fast: bool = False,
                       precision: str = "auto") -> Dict:
    """Recall@1/5/10, mAP@R and DINO's weighted k-NN accuracy of a checkpoint's embeddings on a labelled dataset:
    the held-out split is the queries, the training split the database; images are preprocessed as the
    checkpoint says (no augmentation). With `out`, the result is also written there as JSON (atomically).
    `fast`: embed with vitkit.optimize in `precision` (the result records which)."""
    from .. import validate as v
    from ..data import build_datasets

    v.integer(batch_size, "batch_size", lo=1)
    v.integer(knn_k, "knn_k", lo=1)
    v.number(temperature, "temperature", lo=0, lo_open=True)

    if model is None:
        model = load_vit(checkpoint, "eval-retrieval")  # an MAE: its encoder
    model.eval()
    pool = pool or default_pool(model, layer)
    _check_pool(model, pool, layer)
    pre = Preprocessing.of(model)
    c = model.config
    train, val, info = build_datasets(data, img_size=pre.size, in_chans=c.in_chans,
                                      augment="none", mean=pre.mean, std=pre.std,
                                      crop_pct=float(pre.crop_pct), data_dir=data_dir,
                                      download=download, max_train=max_train, max_val=max_val)
    if fast and layer is None:
        from ..models.fast import optimize

        model = optimize(model, precision=precision)
    db, db_labels = embed_dataset(model, train, pool, layer, batch_size, progress)
    q, q_labels = embed_dataset(model, val, pool, layer, batch_size, progress)
    report = retrieval_report(q, q_labels, db, db_labels, knn_k=knn_k, temperature=temperature)
    res = {"checkpoint": str(checkpoint), "data": info.spec, "pool": pool, "layer": layer,
           **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in report.items()},
           "knn": {"k": knn_k, "temperature": temperature}, **precision_record(model)}
    if out:
        text = json.dumps(res, indent=2) + "\n"
        atomic_write(Path(out), lambda tmp: Path(tmp).write_text(text))
    return res


# ---- the picture -------------------------------------------------------------------------------------------------
def save_grid(path, queries: Sequence, results: List[List[dict]], query_labels: Optional[Sequence] = None,
              channels: int = 3, thumb: float = 1.6) -> Path:
    """A PNG with one row per query: the query image, then its neighbours with score and label. Every image is
    downscaled to its thumbnail before it is drawn, so memory does not follow the images' own size."""
    from ..data import read_image
    from ..io.plots import pyplot, save_png

    plt = pyplot()

    side = int(thumb * GRID_DPI * 2)  # pixels per thumbnail, twice what the figure shows

    def small(p):
        """The image read at a reduced JPEG scale where possible and shrunk to `side`: never drawn full size."""
        im = read_image(p, channels, draft_size=side)
        im.thumbnail((side, side))
        return np.asarray(im)

    cols = 1 + max((len(r) for r in results), default=0)
    fig, axes = plt.subplots(len(queries), cols, figsize=(thumb * cols, thumb * 1.3 * len(queries)), squeeze=False)
    cmap = "gray" if channels == 1 else None
    for row, (q, res) in enumerate(zip(queries, results)):
        for ax in axes[row]:
            ax.axis("off")
        axes[row][0].imshow(small(q), cmap=cmap)
        ql = query_labels[row] if query_labels is not None else None
        axes[row][0].set_title("query" + (f"\n{ql}" if ql is not None else f"\n{Path(q).name[:14]}"), fontsize=8)
        for j, r in enumerate(res):
            ax = axes[row][j + 1]
            try:
                ax.imshow(small(r["path"]), cmap=cmap)
            except (DataError, FileNotFoundError, TypeError):
                ax.text(0.5, 0.5, "(image gone)", ha="center", va="center", fontsize=7)
            lab = f"\n{r['label']}" if r.get("label") is not None else ""
            ax.set_title(f"#{r['rank']} {r['score']:.3f}{lab}", fontsize=8,
                         color="green" if ql is not None and r.get("label") == ql else "black")
    fig.tight_layout()
    return save_png(fig, path, dpi=GRID_DPI)


def warn_precision(index_precision: str, query_precision: str, what: str) -> bool:
    """Warn (once per search) when the queries were embedded in another precision than the index's vectors: the
    scores then carry both precisions' rounding. Returns whether it warned."""
    if index_precision == query_precision:
        return False
    log.warning("%s holds %s embeddings but the queries are %s: scores may differ slightly from a same-precision "
                "search (search with --precision %s, or rebuild the index in %s)", what, index_precision,
                query_precision, index_precision if index_precision in ("fp32", "bf16", "int8") else "fp32",
                query_precision)
    return True


def search(index, queries: Sequence, k: int = 10, *, checkpoint=None, grid=None, nprobe: Optional[int] = None,
           ef_search: Optional[int] = None, mmap: bool = False, precision: Optional[str] = None) -> dict:
    """The k nearest entries of an index folder to each query image, embedded by the index's model (or by
    `checkpoint`, which must be the same model); with `grid`, also a PNG of queries and neighbours. `mmap`: open
    the index memory-mapped (`Index.load`). `precision`: embed the queries with vitkit.optimize in that precision
    (default: the plain fp32 model); a precision other than the index's is a warning."""
    from .. import validate as v
    from ..data.inputs import load_batch

    v.integer(k, "k", lo=1)  # before the (possibly long) loads
    v.integer(nprobe, "nprobe", lo=1, optional=True)
    v.integer(ef_search, "ef_search", lo=1, optional=True)
    ix = Index.load(index, mmap=mmap)
    if nprobe or ef_search:
        ix.set_search_params(nprobe=nprobe, ef_search=ef_search)
    im = ix.model or {}
    ckpt = checkpoint or im.get("checkpoint")
    if not ckpt:
        raise ConfigError("the index does not record a checkpoint; pass --checkpoint")
    if not Path(ckpt).exists():
        raise FileNotFoundError(f"the index's model {ckpt!r} is gone; pass --checkpoint with the same model")
    model = load_vit(ckpt, "search")  # an MAE: its encoder
    check_same_model(im, model_manifest(model, ckpt, im.get("pool"), im.get("layer")), what=f"index {str(index)!r}")
    batch = load_batch(queries, model)
    if precision is not None and im.get("layer") is None:
        from ..models.fast import optimize

        model = optimize(model, precision=precision)
    q = embed_images(model, batch, im.get("pool"), im.get("layer"))
    warn_precision(im.get("precision", "fp32"), precision_record(model)["precision"], f"index {str(index)!r}")
    results = ix.neighbours(q, k)
    out = [{"query": str(Path(p).resolve()), "neighbours": r} for p, r in zip(queries, results)]
    if grid:
        save_grid(grid, queries, results, channels=model.config.in_chans)
    return {"index": index, "k": k, "grid": grid or None, "results": out}


def build_index_folder(embeddings, out, kind: str = "flat", *, overwrite: bool = False, ondisk: Optional[bool] = None,
                       **params) -> Index:
    """An index of one embeddings file or several (a list: one per process or per shard, in order; ids follow
    that order), saved as the folder `out`; an existing index is replaced only when `overwrite`. One writer at a time
    per folder (writer_lock): another waits.

    `ondisk` (IVF only; the default for an IVF index of several files): the IVF cells are trained once on a sample
    of all the vectors, each file's vectors go into their own shard index, and the shards' inverted lists are
    merged into one file on disk (faiss `merge_ondisk`: index.ivfdata beside index.faiss), read memory-mapped by
    `Index.load`, so neither the build nor a search holds all the vectors in memory. Its neighbours are those of
    the same index built in memory. Otherwise the files' vectors are put together in memory."""
    from .. import validate as v

    out = Path(out)
    files = [embeddings] if isinstance(embeddings, (str, os.PathLike)) else list(embeddings)
    if not files:
        raise ConfigError("no embeddings files given; pass one or more files from `vitkit embed`")
    for k, lo in (("nprobe", 1), ("M", 2), ("ef_search", 1), ("nlist", 1)):  # before the load (Index rechecks)
        if k in params:
            v.integer(params[k], k, lo=lo, optional=k == "nlist")
    ondisk = kind == "ivf" and len(files) > 1 if ondisk is None else bool(ondisk)
    if ondisk and kind != "ivf":
        raise ConfigError(f"an on-disk index is an IVF index; pass --kind ivf (got --kind {kind})")
    with writer_lock(out):
        if (out / "manifest.json").exists() and not overwrite:
            raise FileExistsError(f"index {str(out)!r} exists; pass --overwrite to replace it, or `vitkit index "
                                  "add` to append to it")
        if ondisk:
            return _build_ondisk(files, out, **params)
        embs = [Embeddings.load(f) for f in files]
        _check_shards(files, embs)
        emb = embs[0] if len(embs) == 1 else Embeddings(
            np.concatenate([e.vectors for e in embs]), [p for e in embs for p in e.paths],
            [lab for e in embs for lab in e.labels], [k for e in embs for k in e.keys], embs[0].model)
        index = build_index(emb, kind, **params)
        index.save(out)
        (out / IVFDATA).unlink(missing_ok=True)  # an on-disk index's lists this one replaced
    return index


def _check_shards(files: Sequence, embs: Sequence[Embeddings], seen: Optional[set] = None) -> None:
    """Embeddings files indexed together must come from one model and must not repeat an image."""
    seen = set() if seen is None else seen
    for f, e in zip(files, embs):
        check_same_model(embs[0].model, e.model, what=f"embeddings file {str(files[0])!r}")
        for p in e.paths:
            if p in seen:
                raise DataError(f"image {p!r} is in two of the embeddings files (again in {str(f)!r}); index each "
                                "image once: embed disjoint folders, or pass each file once")
            seen.add(p)


def _build_ondisk(files: Sequence, out: Path, nlist: Optional[int] = None, nprobe: int = 16, **params) -> Index:
    """build_index_folder's on-disk IVF: one pass over the files for the count and the training sample (the same
    sample `Index.add` would draw from all the vectors at once, so the cells are the ones an in-memory build trains),
    one pass adding each file as a shard (ids = positions in the files' order), then merge_ondisk. The files are read
    one at a time; the work happens in a hidden folder inside `out` and its results are renamed into place."""
    import shutil
    import tempfile

    from faiss.contrib.ondisk import merge_ondisk

    faiss = _faiss()
    counts: List[int] = []
    seen: set = set()
    paths: List[str] = []
    labels: List[Optional[str]] = []
    model, dim = None, None
    for f in files:
        e = Embeddings.load(f)
        if model is None:
            model, dim = e.model, e.vectors.shape[1]
        check_same_model(model, e.model, what=f"embeddings file {str(files[0])!r}")
        if e.vectors.shape[1] != dim:
            raise DataError(f"{str(f)!r} holds {e.vectors.shape[1]}-dimensional embeddings, {str(files[0])!r} "
                            f"{dim}-dimensional; index embeddings of one model and layer")
        _check_shards([f], [e], seen)
        counts.append(len(e))
        paths += e.paths
        labels += e.labels
    n = sum(counts)
    nlist, sample = _ivf_training_plan(n, nlist)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    train = np.zeros((n if sample is None else len(sample), dim), np.float32)
    for i, f in enumerate(files):  # the sample's rows, in the sample's order (k-means starts from its order)
        x = _unit(Embeddings.load(f).vectors)
        if sample is None:
            train[offsets[i]:offsets[i + 1]] = x
        else:
            at = np.nonzero((sample >= offsets[i]) & (sample < offsets[i + 1]))[0]
            train[at] = x[sample[at] - offsets[i]]
    trained = _trained_ivf(dim, nlist, train)
    del train
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
    try:
        shards = []
        for i, f in enumerate(files):
            shard = faiss.clone_index(trained)
            shard.add_with_ids(_unit(Embeddings.load(f).vectors), np.arange(offsets[i], offsets[i + 1], dtype=np.int64))
            shards.append(str(work / f"shard{i:05d}.faiss"))
            faiss.write_index(shard, shards[-1])
            del shard
        merged = faiss.clone_index(trained)
        merged.nprobe = min(nprobe, nlist)  # as an in-memory build sets it
        with _faiss_prints_to_stderr():
            merge_ondisk(merged, shards, str(work / IVFDATA))
            faiss.write_index(merged, str(work / "index.faiss"))
        del merged
        index = Index(dim, "ivf", model, nlist=nlist, nprobe=nprobe, **params)
        index.params["nlist"] = nlist
        index.paths, index.labels, index.storage = paths, labels, "ondisk"
        os.replace(work / IVFDATA, out / IVFDATA)
        os.replace(work / "index.faiss", out / "index.faiss")
        manifest = {**index.manifest(), "count": n}  # the faiss index is on disk now, not in `index`
        atomic_write(out / "manifest.json", lambda tmp: Path(tmp).write_text(json.dumps(manifest)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Index.load(out)


def add_to_index(index, embeddings) -> dict:
    """Append an embeddings file's entries that an index folder does not hold yet (by path, same model only), as one
    locked load-add-save: a concurrent add waits, nothing is lost. Returns the counts."""
    index = Path(index)
    if not (index / "manifest.json").is_file():
        Index.load(index)  # its clear "not a vitkit index" error, before a lock file is made beside it
    with writer_lock(index):
        ix = Index.load(index)
        emb = Embeddings.load(embeddings)
        added = ix.add_new(emb)
        ix.save(index)
    return {"added": added, "skipped_already_indexed": len(emb) - added, "count": len(ix)}


__all__ = ["POOLS", "INDEX_KINDS", "embed_images", "embed_paths", "embed_folder", "Embeddings", "Index",
           "build_index", "model_manifest", "writer_lock", "check_same_model", "recall_at_k", "map_at_r",
           "knn_classify", "retrieval_report", "save_grid", "default_pool", "embed_dataset", "evaluate_retrieval",
           "search", "build_index_folder", "add_to_index"]
