"""MAE: masking, fixed positions, the checkpoint layout, learning, and the encoder handed to a classifier."""
import numpy as np
import pytest
import torch

from vitkit.models.mae import (MAEConfig, MaskedAutoencoderViT, patchify, random_masking, sincos_pos_embed_2d,
                               unpatchify)

TINY = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
            decoder_depth=1, decoder_num_heads=2)


def _mae_reference_pos_embed(embed_dim, grid_size):
    """facebookresearch/mae util/pos_embed.py, transcribed in numpy."""
    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_size, grid_size)
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def test_sincos_matches_mae_reference():
    ours = sincos_pos_embed_2d(64, (5, 5), num_prefix_tokens=1).numpy()
    np.testing.assert_allclose(ours, _mae_reference_pos_embed(64, 5), atol=1e-6)


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9, 0.0])
def test_masking_keeps_ratio_and_visible_patches(ratio):
    x = torch.randn(4, 16, 8)
    kept, mask, ids_restore = random_masking(x, ratio)
    n_masked = round(16 * ratio)
    assert kept.shape == (4, 16 - n_masked, 8)
    assert (mask.sum(1) == n_masked).all()
    # every kept token is one of the image's visible tokens, bit for bit, and covers exactly the unmasked slots
    for b in range(4):
        visible = x[b][mask[b] == 0]
        assert torch.equal(torch.sort(kept[b], dim=0).values, torch.sort(visible, dim=0).values)
    # ids_restore undoes the shuffle
    full = torch.cat([kept, torch.zeros(4, n_masked, 8)], 1)
    restored = torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, 8))
    assert torch.equal(restored[mask == 0], x[mask == 0])


def test_masks_differ_per_image_and_follow_the_generator():
    x = torch.randn(8, 49, 4)
    _, m1, _ = random_masking(x, 0.75, generator=torch.Generator().manual_seed(1))
    _, m2, _ = random_masking(x, 0.75, generator=torch.Generator().manual_seed(1))
    assert torch.equal(m1, m2)
    assert len({tuple(r.tolist()) for r in m1}) > 1


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 28, 28)
    p = patchify(x, 7)
    assert p.shape == (2, 16, 147)
    assert torch.equal(p[0, 1].reshape(7, 7, 3).permute(2, 0, 1), x[0, :, 0:7, 7:14])
    assert torch.equal(unpatchify(p, 7, (4, 4), 3), x)


def test_checkpoint_layout_and_frozen_positions():
    m = MaskedAutoencoderViT(MAEConfig(**TINY))
    keys = set(m.state_dict())
    for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "norm.weight",
              "mask_token", "decoder_embed.weight", "decoder_pos_embed", "decoder_blocks.0.mlp.fc1.weight",
              "decoder_norm.weight", "decoder_pred.weight"):
        assert k in keys, k
    assert not any(k.startswith("head") for k in keys)
    assert m.decoder_pred.out_features == 7 * 7 * 1
    assert not m.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad
    assert torch.equal(m.pos_embed[0, 0], torch.zeros(32))


def test_encoder_sees_only_visible_patches():
    m = MaskedAutoencoderViT(MAEConfig(**TINY)).eval()
    x = torch.randn(3, 1, 28, 28)
    latent, mask, _ = m.forward_encoder(x, 0.75)
    assert latent.shape == (3, 1 + 4, 32) and (mask.sum(1) == 12).all()
    # the visible tokens are independent of the masked pixels: changing a masked patch changes nothing
    noise = torch.rand(3, 16)
    latent1, mask, _ = m.forward_encoder(x, 0.75, noise=noise)
    x2 = x.clone()
    b, j = 0, int(mask[0].nonzero()[0])
    r, c = divmod(j, 4)
    x2[b, :, r * 7:(r + 1) * 7, c * 7:(c + 1) * 7] += 5.0
    latent2, _, _ = m.forward_encoder(x2, 0.75, noise=noise)
    assert torch.allclose(latent1, latent2, atol=1e-6)


def test_loss_counts_masked_patches_only():
    m = MaskedAutoencoderViT(MAEConfig(**TINY, norm_pix_loss=False))
    x = torch.randn(2, 1, 28, 28)
    _, pred, mask = m(x, 0.5)
    pred_exact_on_masked = torch.where(mask.bool().unsqueeze(-1), m.targets(x), pred)
    assert m.forward_loss(x, pred_exact_on_masked, mask).item() == 0.0
    assert m.forward_loss(x, pred, mask).item() > 0.0


def test_one_step_lowers_the_loss():
    m = MaskedAutoencoderViT(MAEConfig(**TINY))
    x = torch.randn(16, 1, 28, 28)
    noise = torch.rand(16, 16)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    before = m(x, noise=noise)[0]
    opt.zero_grad()
    before.backward()
    opt.step()
    after = m(x, noise=noise)[0]
    assert after.item() < before.item()


def test_to_encoder_gives_a_classifier_with_the_pretrained_weights():
    m = MaskedAutoencoderViT(MAEConfig(**TINY))
    vit = m.to_encoder(num_classes=10)
    assert type(vit).__name__ == "VisionTransformer" and vit.num_classes == 10
    assert not any(k.startswith(("decoder", "mask_token")) for k in vit.state_dict())
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, m.blocks[1].mlp.fc2.weight)
    assert torch.equal(vit.pos_embed, m.pos_embed) and vit.pos_embed.requires_grad
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():  # with no masking the encoder is the same network as the classifier's trunk
        latent, _, ids = m.forward_encoder(x, 0.0, noise=torch.arange(16.0).expand(2, 16))
        assert torch.allclose(latent, vit.forward_features(x), atol=1e-5)
    assert vit(x).shape == (2, 10)


def test_save_load_roundtrip(tmp_path):
    import vitkit

    m = MaskedAutoencoderViT(MAEConfig(**TINY)).eval()
    path = vitkit.save(m, tmp_path / "mae.safetensors")
    m2 = vitkit.load(path)
    assert type(m2) is MaskedAutoencoderViT and m2.config == m.config
    x = torch.randn(2, 1, 28, 28)
    noise = torch.rand(2, 16)
    assert torch.equal(m(x, noise=noise)[1], m2(x, noise=noise)[1])
    # and as the starting point of a classifier: the decoder is dropped
    clf = vitkit.io.load_pretrained(path, num_classes=10)
    assert type(clf).__name__ == "VisionTransformer" and clf.num_classes == 10
