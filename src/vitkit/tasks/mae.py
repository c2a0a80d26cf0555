"""Masked-autoencoder pretraining (a user of `vitkit.train.Trainer`) and reconstruction grids.

    summary = pretrain_mae(MAETaskConfig(data="mnist5k"), TrainConfig(name="mae", time_budget=300))
    # then: vitkit train --data mnist5k --init runs/mae   (the encoder becomes the classifier, the decoder is dropped)
    reconstruct("runs/mae", images, "grid.png", mask_ratio=0.75, seed=0)

Pretraining uses the images only (labels are ignored), with the dataset's own normalisation, so the encoder
sees at fine-tuning time exactly the inputs it was pretrained on.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch

from ..data import DataOptions, collect_images, eval_transform, read_image
from ..errors import CheckpointError, ConfigError
from ..io.plots import save_image_grid
from ..models import Preprocessing, denormalize, get_config
from ..models.mae import MaskedAutoencoderViT, mae_config_for
from ..train import Trainer, TrainConfig, claim_run, mean_over_batches, resume_configs

log = logging.getLogger(__name__)

# mnist5k: the encoder is the classifier recipe's vit_mini_patch7_28 (so `train --init` fine-tunes the same
# architecture as the from-scratch demo); a 2-block, 64-wide decoder, as light relative to the encoder as MAE's.
RECIPES: Dict[str, dict] = {
    "mnist5k": dict(model="vit_mini_patch7_28", decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                    batch_size=128, lr=1.5e-3, weight_decay=0.05, betas=(0.9, 0.95), warmup=0.05,
                    time_budget=300.0, augment="light", best_metric="val_loss", best_mode="min"),
}
DEFAULT_RECIPE = dict(model="vit_tiny_patch16_224", decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8,
                      batch_size=128, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95), warmup=0.05,
                      epochs=200, augment="light", best_metric="val_loss", best_mode="min")


@dataclass
class MAETaskConfig(DataOptions):
    """The task half of a `pretrain --method mae` run (the engine half is `TrainConfig`); the data fields are
    `DataOptions`'."""

    augment: str = "light"
    model: Optional[str] = None  # the encoder: a registered ViT config; None → the dataset's recipe
    model_args: Dict = field(default_factory=dict)  # ViTConfig overrides for the encoder
    decoder_embed_dim: Optional[int] = None
    decoder_depth: Optional[int] = None
    decoder_num_heads: Optional[int] = None
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True

    def __post_init__(self) -> None:
        from .. import validate as v
        from ..models.config import ViTConfig

        super().__post_init__()
        ViTConfig.check_fields(dict(self.model_args))
        for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
            v.integer(getattr(self, k), k, lo=1, optional=True)
        v.number(self.mask_ratio, "mask_ratio", lo=0, hi=1, hi_open=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def recipe_for(data: str) -> dict:
    return dict(RECIPES.get(data, DEFAULT_RECIPE))


def build_mae(task: MAETaskConfig) -> MaskedAutoencoderViT:
    r = recipe_for(task.data)
    enc = get_config(task.model or r["model"]).replace(**task.model_args)
    dec = {k: getattr(task, k) if getattr(task, k) is not None else r[k]
           for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")}
    return MaskedAutoencoderViT(mae_config_for(enc, mask_ratio=task.mask_ratio, norm_pix_loss=task.norm_pix_loss,
                                               **dec))


def mae_loss(model, batch):
    """(model, (x, labels)) → masked-patch reconstruction loss; the labels are not used."""
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    loss, _, _ = model(x)
    return loss, {}


@torch.no_grad()
def masked_loss(model, dataset, batch_size: int = 250, seed: int = 0) -> float:
    """Reconstruction loss on held-out images with masks fixed by `seed` (comparable across epochs)."""
    g = torch.Generator().manual_seed(seed)

    def batch_loss(x, _):
        noise = torch.rand(x.shape[0], model.patch_embed.num_patches, generator=g).to(x.device)
        return model(x, noise=noise)[0]

    return mean_over_batches(model, dataset, batch_loss, batch_size)


def pretrain_mae(task: MAETaskConfig, train_cfg: TrainConfig, *, on_epoch_end=None) -> dict:
    """MAE pretraining on `task.data`'s training images (no labels) with the engine; returns the summary.
    `on_epoch_end(trainer, row)` is the engine's per-epoch hook."""
    with claim_run(train_cfg, is_main=os.environ.get("RANK", "0") == "0") as run:  # before the data is read
        if train_cfg.resume:
            task, train_cfg = resume_configs(train_cfg, "mae", "mae", MAETaskConfig, "an MAE pretraining run")
        return _pretrain(task, train_cfg, on_epoch_end, run)


def _pretrain(task: MAETaskConfig, train_cfg: TrainConfig, on_epoch_end, run) -> dict:
    """pretrain_mae once its run folder is claimed."""
    torch.manual_seed(train_cfg.seed)
    model = build_mae(task)
    c = model.config
    train, val, info = task.datasets(train_cfg.seed, img_size=c.img_size, in_chans=c.in_chans)
    model.pretrained_cfg = dataclasses.replace(Preprocessing.default(c), mean=tuple(info.mean), std=tuple(info.std),
                                               interpolation="bilinear", extra={"dataset": info.spec}).to_dict()
    resolved = {"task": "mae", "mae": task.to_dict(), "model": c.to_dict(), "data": info.to_dict()}

    def eval_fn(m):
        return {"val_loss": masked_loss(m, val)}

    def end_fn(trainer, summary):
        run = trainer.run.path
        from ..io import load

        best = load(run / "last.safetensors")
        idx = torch.linspace(0, len(val) - 1, min(8, len(val))).long().tolist()  # spread over the classes
        x = torch.stack([val[i][0] for i in idx])
        reconstruction_grid(best, x, run / "reconstructions.png", seed=0)
        md = ["## Reconstructions", "", f"mask ratio {c.mask_ratio}, held-out images; columns: original | masked "
              "| reconstruction | reconstruction + visible: ![reconstructions](reconstructions.png)", ""]
        return {"reconstructions": str(run / "reconstructions.png"), "markdown": "\n".join(md)}

    log.info("MAE on %s: %d images (labels unused); encoder %s %.2fM params, decoder %d×%d, mask ratio %.2f",
             info.spec, len(train), c.name or "custom",
             sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("decoder", "mask"))) / 1e6,
             c.decoder_depth, c.decoder_embed_dim, c.mask_ratio)
    trainer = Trainer(model, train, train_cfg, mae_loss, eval_fn, resolved=resolved, end_fn=end_fn,
                      on_epoch_end=on_epoch_end, run=run)
    return trainer.fit()


# ---- reconstructions ------------------------------------------------------------------------------------------
@torch.no_grad()
def reconstruction_grid(model: MaskedAutoencoderViT, x: torch.Tensor, path, mask_ratio: Optional[float] = None,
                        seed: int = 0) -> Path:
    """Normalised images (B, C, H, W) → a PNG with one row per image: original | masked input | reconstruction |
    reconstruction with the visible patches pasted back. The mask comes from `seed`."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    rec, mask = model.reconstruct(x, mask_ratio, generator=g)
    pre = Preprocessing.of(model)
    to01 = lambda t: denormalize(t, pre).clamp(0, 1)  # noqa: E731
    orig, rec = to01(x), to01(rec)
    masked = orig * (1 - mask) + 0.5 * mask  # masked patches shown grey
    pasted = orig * (1 - mask) + rec * mask
    rows = torch.stack([orig, masked, rec, pasted], dim=1).flatten(0, 1)
    return save_image_grid(rows, path, nrow=4, scale=3)


def reconstruct(checkpoint, images, out, *, mask_ratio: Optional[float] = None, seed: int = 0) -> Path:
    """Image files or folders → a reconstruction grid PNG from an MAE checkpoint (see `reconstruction_grid`)."""
    from ..io import load

    from .. import validate as v

    v.number(mask_ratio, "mask_ratio", lo=0, hi=1, hi_open=True, optional=True)
    model = load(checkpoint)
    if not isinstance(model, MaskedAutoencoderViT):
        raise CheckpointError(f"{str(checkpoint)!r} holds a {type(model).__name__}, not an MAE; reconstruct needs a "
                              "checkpoint from `vitkit pretrain --method mae`")
    if mask_ratio is not None and not 0.0 <= mask_ratio < 1.0:
        raise ConfigError(f"--mask-ratio must be in [0, 1), got {mask_ratio}")
    c = model.config
    tf = eval_transform(Preprocessing.of(model), c.img_size)
    files = collect_images(images)
    x = torch.stack([tf(read_image(f, c.in_chans)) for f in files])
    return reconstruction_grid(model, x, out, mask_ratio=mask_ratio, seed=seed)


__all__ = ["MAETaskConfig", "pretrain_mae", "build_mae", "mae_loss", "masked_loss", "reconstruction_grid",
           "reconstruct", "recipe_for"]
