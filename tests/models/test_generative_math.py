"""MAE, DiT and the two diffusion objectives against their equations, on tiny models with every parameter random:
MAE's masking, decoder, normalised targets, masked loss and reconstruction written out by hand; DiT's timestep
features, adaLN-Zero blocks and final layer; the flow and DDPM losses replayed from the same random draws."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkit.models import ViTConfig
from vitkit.models.diffusion import DDPM, NUM_TIMESTEPS, RectifiedFlow, get_objective
from vitkit.models.dit import DiT, DiTBlock, DiTConfig, LabelEmbedder, TimestepEmbedder, modulate, timestep_embedding
from vitkit.models.mae import (MAEConfig, MaskedAutoencoderViT, mae_config_for, patchify, random_masking,
                               sincos_pos_embed_1d, sincos_pos_embed_2d)

MAE_TINY = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=8, depth=2, num_heads=2, decoder_embed_dim=12,
                decoder_depth=1, decoder_num_heads=3, decoder_mlp_ratio=2.0)


def _randomize(model, seed=0, dtype=torch.float64):
    """Every parameter (frozen position tables included) random, so a sign, a swap or a dropped term shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.to(dtype).eval()


def _patches(imgs, p):
    """(B, C, H, W) → (B, N, p*p*C): each patch row by row over the grid, flattened as (row, column, channel)."""
    B, C, H, W = imgs.shape
    return torch.stack([imgs[:, :, i:i + p, j:j + p].permute(0, 2, 3, 1).reshape(B, -1)
                        for i in range(0, H, p) for j in range(0, W, p)], dim=1)


def _images(patches, p, h, w, c):
    """The inverse of `_patches`, through F.fold."""
    B, L, _ = patches.shape
    cols = patches.reshape(B, L, p, p, c).permute(0, 4, 2, 3, 1).reshape(B, c * p * p, L)
    return F.fold(cols, (h * p, w * p), kernel_size=p, stride=p)


# ---- MAE -----------------------------------------------------------------------------------------------------
def _ref_mae(m, imgs, noise):
    """MAE's forward by hand: (loss, pred, mask, reconstruction with the true patch statistics)."""
    cfg = m.config
    p, B = cfg.patch_size, imgs.shape[0]
    w = m.patch_embed.proj
    tok = F.unfold(imgs, p, stride=p).transpose(1, 2) @ w.weight.reshape(w.weight.shape[0], -1).T + w.bias
    N = tok.shape[1]
    tok = tok + m.pos_embed[:, 1:]
    keep = torch.argsort(noise, dim=1)[:, :N - round(N * cfg.mask_ratio)]
    mask = torch.ones(B, N, dtype=imgs.dtype)
    x = []
    for b in range(B):
        mask[b, keep[b]] = 0
        x.append(tok[b, keep[b]])
    x = torch.cat([(m.cls_token + m.pos_embed[:, :1]).expand(B, -1, -1), torch.stack(x)], 1)
    for blk in m.blocks:
        x = blk(x)
    z = m.norm(x) @ m.decoder_embed.weight.T + m.decoder_embed.bias
    full = m.mask_token.expand(B, N, -1).clone()
    for b in range(B):
        full[b, keep[b]] = z[b, 1:]
    x = torch.cat([z[:, :1], full], 1) + m.decoder_pos_embed
    for blk in m.decoder_blocks:
        x = blk(x)
    pred = (m.decoder_norm(x) @ m.decoder_pred.weight.T + m.decoder_pred.bias)[:, 1:]
    target = _patches(imgs, p)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    if cfg.norm_pix_loss:
        target = (target - mean) / torch.sqrt(var + 1e-6)
    loss = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    shown = pred * torch.sqrt(var + 1e-6) + mean if cfg.norm_pix_loss else pred
    gh, gw = m.patch_embed.grid_size
    return loss, pred, mask, _images(shown, p, gh, gw, cfg.in_chans)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_forward_is_its_equations(norm_pix):
    m = _randomize(MaskedAutoencoderViT(MAEConfig(**MAE_TINY, mask_ratio=0.5, norm_pix_loss=norm_pix, norm_eps=0.1)))
    imgs = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        loss, pred, mask, recon = _ref_mae(m, imgs, noise)
        got_loss, got_pred, got_mask = m(imgs, noise=noise)
        torch.testing.assert_close(got_pred, pred, rtol=1e-9, atol=1e-9)
        assert torch.equal(got_mask.double(), mask) and int(mask.sum()) == 16
        torch.testing.assert_close(got_loss, loss, rtol=1e-9, atol=1e-9)
        # the ratio given to forward wins over the config's; the reconstruction uses the generator's noise
        assert int(m(imgs, 0.25, noise=noise)[2].sum()) == 8
        recon_got, mask_img = m.reconstruct(imgs, generator=torch.Generator().manual_seed(7))
        _, _, mask, recon = _ref_mae(m, imgs, torch.rand(2, 16, generator=torch.Generator().manual_seed(7)))
        torch.testing.assert_close(recon_got, recon, rtol=1e-9, atol=1e-9)
        assert torch.equal(mask_img, _images(mask[..., None].expand(-1, -1, 4), 2, 4, 4, 1).to(mask_img.dtype))
        assert int(m.reconstruct(imgs, 0.25)[1].sum()) == 8 * 4
    assert all(n.eps == 0.1 for n in m.modules() if isinstance(n, nn.LayerNorm))


def test_mae_targets_loss_and_pixels():
    m = MaskedAutoencoderViT(MAEConfig(**MAE_TINY))
    imgs = torch.randn(2, 3, 8, 8)
    target = _patches(imgs, 2)
    assert torch.equal(m.patchify(imgs), target) and torch.equal(patchify(imgs, 2), target)
    assert torch.equal(m.unpatchify(target), imgs)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    torch.testing.assert_close(m.targets(imgs), (target - mean) / torch.sqrt(var + 1e-6))
    pred = torch.randn(2, 16, 12)
    one = torch.zeros(2, 16)
    one[1, 5] = 1  # a single masked patch: the loss is its squared error, not half of it
    err = ((pred - m.targets(imgs)) ** 2).mean(-1)
    torch.testing.assert_close(m.forward_loss(imgs, pred, one), err[1, 5])
    assert m.forward_loss(imgs, pred, torch.zeros(2, 16)).item() == 0.0  # nothing masked: no loss, no NaN


def test_mae_structure_init_and_generator():
    m = MaskedAutoencoderViT(MAEConfig(**{**MAE_TINY, "embed_dim": 64, "num_heads": 4, "decoder_embed_dim": 64,
                                          "decoder_num_heads": 4}))
    assert m.mask_token.shape == (1, 1, 64)
    blk = m.decoder_blocks[0]
    assert blk.attn.num_heads == 4 and blk.attn.qkv.bias is not None and blk.mlp.fc1.out_features == 128
    for t in (m.cls_token, m.mask_token):
        assert 0.01 < t.std().item() < 0.03
    for lin in (m.decoder_embed, m.decoder_pred, blk.attn.qkv, blk.mlp.fc2):
        bound = math.sqrt(6 / (lin.in_features + lin.out_features))
        assert lin.weight.abs().max().item() <= bound and torch.equal(lin.bias, torch.zeros_like(lin.bias))
    torch.testing.assert_close(m.pos_embed[0], sincos_pos_embed_2d(64, (4, 4), 1))
    torch.testing.assert_close(m.decoder_pos_embed[0], sincos_pos_embed_2d(64, (4, 4), 1))
    imgs = torch.randn(3, 3, 8, 8)
    _, mask, _ = m.forward_encoder(imgs, generator=torch.Generator().manual_seed(3))
    _, want, _ = random_masking(torch.zeros(3, 16, 1), 0.75, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mask, want)
    _, _, mask = m(imgs, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mask, want)


def test_mae_config_rules():
    ok = MAEConfig(**MAE_TINY)
    ok.validate()
    ok.replace(mask_ratio=0.0).validate()
    for kw, match in [(dict(reg_tokens=1), "MAE supports the plain ViT layout only: reg_tokens=0"),
                      (dict(no_embed_class=True), "no_embed_class=False"),
                      (dict(dynamic_img_pad=True), "dynamic_img_pad=False"),
                      (dict(decoder_num_heads=5), "decoder_embed_dim 12 must be divisible by decoder_num_heads 5"),
                      (dict(embed_dim=6, num_heads=2), "need embed_dim and decoder_embed_dim divisible by 4"),
                      (dict(decoder_embed_dim=6, decoder_num_heads=2), "divisible by 4"),
                      (dict(mask_ratio=1.0), r"mask_ratio must be in \[0, 1\), got 1.0")]:
        with pytest.raises(ValueError, match=match):
            ok.replace(**kw).validate()
    for bad in (1.0, -0.5):
        with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
            random_masking(torch.zeros(1, 4, 2), bad)
    enc = ViTConfig(img_size=8, patch_size=2, embed_dim=8, depth=2, num_heads=2, num_classes=7)
    cfg = mae_config_for(enc, decoder_embed_dim=16, decoder_depth=2)
    assert isinstance(cfg, MAEConfig) and cfg.num_classes == 0 and cfg.decoder_embed_dim == 16
    assert cfg.decoder_depth == 2 and cfg.embed_dim == 8 and cfg.decoder_num_heads == MAEConfig().decoder_num_heads
    assert MaskedAutoencoderViT(**MAE_TINY).config == MAEConfig(**MAE_TINY)  # keyword arguments alone
    m = MaskedAutoencoderViT(enc, decoder_embed_dim=8, decoder_num_heads=2, decoder_depth=1)
    assert m.config.num_classes == 0 and m.config.depth == 2 and m.config.decoder_embed_dim == 8
    assert m.config.encoder_config() == enc.replace(num_classes=0, fc_norm=None)


def test_mae_to_encoder():
    m = MaskedAutoencoderViT(MAEConfig(**MAE_TINY))
    m.pretrained_cfg = {"mean": [0.1, 0.2, 0.3]}
    vit = m.to_encoder(num_classes=4)
    assert vit.pretrained_cfg == m.pretrained_cfg and vit.pretrained_cfg is not m.pretrained_cfg
    avg = m.to_encoder(num_classes=4, global_pool="avg", fc_norm=True)  # a new fc_norm may start from scratch
    assert isinstance(avg.fc_norm, nn.LayerNorm)
    assert torch.equal(avg.blocks[1].mlp.fc1.weight, m.blocks[1].mlp.fc1.weight)
    with pytest.raises(ValueError, match=r"does not cover the classifier's parameters \['blocks.2.norm1.weight', "
                                         r"'blocks.2.norm1.bias', 'blocks.2.attn.qkv.weight', 'blocks.2.attn.qkv.bias',"
                                         r" 'blocks.2.attn.proj.weight'\]; keep the encoder's architecture"):
        m.to_encoder(depth=3)


def test_sincos_tables():
    pos = torch.tensor([0.0, 1.0, 7.0, 1000.0])
    omega = 1.0 / 10000 ** (np.arange(3, dtype=np.float64) / 3.0)
    want = np.concatenate([np.sin(pos.numpy()[:, None] * omega), np.cos(pos.numpy()[:, None] * omega)], 1)
    got = sincos_pos_embed_1d(6, pos)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    t = sincos_pos_embed_2d(8, (2, 3), num_prefix_tokens=2)
    assert t.dtype == torch.float32 and t.shape == (2 + 6, 8) and torch.equal(t[:2], torch.zeros(2, 8))
    row, col = 1, 2  # the first half encodes the column, the second the row
    want = torch.cat([sincos_pos_embed_1d(4, torch.tensor([col])), sincos_pos_embed_1d(4, torch.tensor([row]))], 1)
    torch.testing.assert_close(t[2 + row * 3 + col], want[0].float())
    with pytest.raises(ValueError, match="need an even width, got 5"):
        sincos_pos_embed_1d(5, pos)
    with pytest.raises(ValueError, match="need a width divisible by 4, got 6"):
        sincos_pos_embed_2d(6, (2, 2))


# ---- DiT -----------------------------------------------------------------------------------------------------
DIT_TINY = dict(img_size=8, patch_size=2, in_chans=2, embed_dim=8, depth=2, num_heads=2, mlp_ratio=2.0,
                num_classes=5, frequency_embedding_size=9)


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _ref_timesteps(t, dim, max_period=10000.0):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], 1)
    return torch.cat([emb, torch.zeros(len(t), dim % 2, dtype=emb.dtype)], 1)


def _ref_dit(m, x, t, y):
    """DiT by hand: patch tokens + positions; c = MLP(timestep features) + class row; adaLN-Zero blocks
    (x + gate * f(LN(x) * (1 + scale) + shift)); the final adaLN and linear layer; patches back to pixels."""
    cfg = m.config
    p, B = cfg.patch_size, x.shape[0]
    w = m.x_embedder.proj
    tok = F.unfold(x, p, stride=p).transpose(1, 2) @ w.weight.reshape(w.weight.shape[0], -1).T + w.bias
    tok = tok + m.pos_embed
    mlp = m.t_embedder.mlp
    te = _ref_timesteps(t, cfg.frequency_embedding_size).float()
    c = F.silu(te @ mlp[0].weight.T + mlp[0].bias) @ mlp[2].weight.T + mlp[2].bias
    c = c + m.y_embedder.embedding_table.weight[y]
    for blk in m.blocks:
        lin = blk.adaLN_modulation[1]
        s1, sc1, g1, s2, sc2, g2 = (F.silu(c) @ lin.weight.T + lin.bias).chunk(6, dim=1)
        tok = tok + g1[:, None] * blk.attn(_ln(tok) * (1 + sc1[:, None]) + s1[:, None])
        h = _ln(tok) * (1 + sc2[:, None]) + s2[:, None]
        f = blk.mlp
        tok = tok + g2[:, None] * (F.gelu(h @ f.fc1.weight.T + f.fc1.bias, approximate="tanh") @ f.fc2.weight.T
                                   + f.fc2.bias)
    lin = m.final_layer.adaLN_modulation[1]
    shift, scale = (F.silu(c) @ lin.weight.T + lin.bias).chunk(2, dim=1)
    out = (_ln(tok) * (1 + scale[:, None]) + shift[:, None]) @ m.final_layer.linear.weight.T + m.final_layer.linear.bias
    gh, gw = m.x_embedder.grid_size
    return _images(out, p, gh, gw, cfg.in_chans)


def test_dit_forward_is_its_equations():
    m = _randomize(DiT(DiTConfig(**DIT_TINY)), dtype=torch.float32)
    x = torch.randn(3, 2, 8, 8)
    t = torch.tensor([0.0, 250.5, 999.0])
    y = torch.tensor([0, 4, 5])  # 5: the null class
    with torch.no_grad():
        want = _ref_dit(m, x, t, y)
        torch.testing.assert_close(m(x, t, y), want, rtol=1e-4, atol=1e-5)
        # a scalar timestep is every image's, with and without guidance
        torch.testing.assert_close(m(x, torch.tensor(250.5), y), m(x, torch.full((3,), 250.5), y))
        null = torch.full_like(y, 5)
        cond, uncond = m(x, torch.full((3,), 40.0), y), m(x, torch.full((3,), 40.0), null)
        torch.testing.assert_close(m.forward_with_cfg(x, torch.tensor(40.0), y, 2.5), uncond + 2.5 * (cond - uncond),
                                   rtol=1e-4, atol=1e-5)
    assert torch.equal(m.patchify(x), _patches(x, 2)) and torch.equal(m.unpatchify(_patches(x, 2)), x)
    for ln in (m.blocks[0].norm1, m.blocks[0].norm2, m.final_layer.norm_final):
        assert ln.eps == 1e-6 and ln.weight is None


def test_dit_pieces():
    t = torch.tensor([0.0, 3.5, 999.0])
    for dim in (8, 9):
        torch.testing.assert_close(timestep_embedding(t, dim), _ref_timesteps(t, dim).float())
    torch.testing.assert_close(timestep_embedding(t, 6, max_period=100.0), _ref_timesteps(t, 6, 100.0).float())
    x, shift, scale = torch.randn(2, 3, 4), torch.randn(2, 4), torch.randn(2, 4)
    torch.testing.assert_close(modulate(x, shift, scale), x * (1 + scale[:, None]) + shift[:, None])
    assert TimestepEmbedder(8).mlp[0].in_features == 256 and TimestepEmbedder(8).frequency_embedding_size == 256
    blk = DiTBlock(8, 2)
    assert blk.mlp.fc1.out_features == 32 and blk.attn.num_heads == 2 and blk.attn.qkv.bias is not None
    m = DiT(**DIT_TINY)
    assert m.config == DiTConfig(**DIT_TINY)  # keyword arguments alone
    assert DiT(DiTConfig(**DIT_TINY), depth=1).config.depth == 1
    assert m.t_embedder.mlp[0].in_features == 9 and m.blocks[0].mlp.fc1.out_features == 16
    with pytest.raises(ValueError, match=r"unknown DiT option\(s\) \['dpeth'\]"):
        DiTConfig().replace(dpeth=1)


def test_dit_init():
    m = DiT(DiTConfig(**{**DIT_TINY, "embed_dim": 64, "frequency_embedding_size": 256}))
    for w in (m.y_embedder.embedding_table.weight, m.t_embedder.mlp[0].weight, m.t_embedder.mlp[2].weight):
        assert 0.017 < w.std().item() < 0.023
    proj = m.x_embedder.proj.weight  # xavier over the flattened patch: fan_in C*p*p, fan_out D
    bound = math.sqrt(6 / (2 * 4 + 64))
    assert 0.9 * bound < proj.abs().max().item() <= bound
    for lin in (m.blocks[0].attn.qkv, m.blocks[0].mlp.fc1, m.x_embedder.proj, m.t_embedder.mlp[0]):
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
    for lin in (m.blocks[1].adaLN_modulation[1], m.final_layer.adaLN_modulation[1], m.final_layer.linear):
        assert not lin.weight.any() and not lin.bias.any()


def test_dit_labels_config_and_dropout():
    m = DiT(DiTConfig(**DIT_TINY))
    with pytest.raises(ValueError, match=r"class 6 is out of range: this DiT knows classes 0..4 \(and 5 = "):
        m.check_labels(torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="class -1 is out of range"):
        m.check_labels(torch.tensor([-1]))
    m.check_labels(torch.tensor([0, 4, 5]))
    DiTConfig(num_classes=1).validate()
    for kw, match in [(dict(num_heads=5), "embed_dim 192 must be divisible by num_heads 5"),
                      (dict(embed_dim=18, num_heads=3), "embed_dim 18 must be divisible by 4"),
                      (dict(img_size=30), "img_size 30 must be a multiple of patch_size 4"),
                      (dict(objective="edm"), r"objective must be one of \('flow', 'ddpm'\), got 'edm'"),
                      (dict(num_classes=0), "needs num_classes >= 1")]:
        with pytest.raises(ValueError, match=match):
            DiTConfig(**kw).validate()
    emb = LabelEmbedder(5, 4, 0.5)
    labels = torch.arange(5).repeat(40)
    drop = torch.rand(200, generator=torch.Generator().manual_seed(2)) < 0.5
    assert torch.equal(emb.token_drop(labels, torch.Generator().manual_seed(2)), torch.where(drop, 5, labels))
    emb.train()
    want = emb.embedding_table.weight[torch.where(drop, 5, labels)]
    assert torch.equal(emb(labels, torch.Generator().manual_seed(2)), want)
    assert torch.equal(emb.eval()(labels), emb.embedding_table.weight[labels])
    # the DiT hands its generator down: seeded training forwards repeat
    d = _randomize(DiT(DiTConfig(**{**DIT_TINY, "class_dropout_prob": 0.5})), dtype=torch.float32).train()
    x, t, y = torch.randn(4, 2, 8, 8), torch.full((4,), 10.0), torch.tensor([0, 1, 2, 3])
    a = d(x, t, y, generator=torch.Generator().manual_seed(5))
    # the same grad mode for both: a training forward with grad may take another (equal-in-math) attention kernel
    d.y_embedder.eval()
    kept = torch.rand(4, generator=torch.Generator().manual_seed(5)) >= 0.5
    assert torch.equal(a, d(x, t, torch.where(kept, y, 5)))


# ---- the diffusion objectives ----------------------------------------------------------------------------------
class _Recorder(nn.Module):
    """A stand-in denoiser that records what the objective feeds it and answers with a fixed function of it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y, generator=None):
        self.calls.append((x, t, y, generator))
        return torch.tanh(x) + t.view(-1, 1, 1, 1) / 1000


def test_flow_loss_is_velocity_regression_on_the_straight_line():
    x0, y = torch.rand(3, 2, 4, 4) * 2 - 1, torch.tensor([1, 2, 3])
    model, g = _Recorder(), torch.Generator().manual_seed(4)
    loss = RectifiedFlow().loss(model, x0, y, generator=g)
    again = torch.Generator().manual_seed(4)
    t = torch.rand(3, generator=again)
    noise = torch.randn(x0.shape, generator=again)
    xt = (1 - t.view(3, 1, 1, 1)) * x0 + t.view(3, 1, 1, 1) * noise
    (x_seen, t_seen, y_seen, g_seen), = model.calls
    torch.testing.assert_close(x_seen, xt)
    torch.testing.assert_close(t_seen, t * NUM_TIMESTEPS)
    assert torch.equal(y_seen, y) and g_seen is g
    torch.testing.assert_close(loss, ((model(xt, t * NUM_TIMESTEPS, y) - (noise - x0)) ** 2).mean())


def test_ddpm_schedule_and_loss():
    ddpm = DDPM()
    want = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    assert ddpm.alphas_cumprod.dtype == torch.float64 and ddpm.num_timesteps == 1000
    np.testing.assert_allclose(ddpm.alphas_cumprod.numpy(), want, rtol=1e-12)
    short = DDPM(beta_start=0.1, beta_end=0.5, num_timesteps=3)
    np.testing.assert_allclose(short.alphas_cumprod.numpy(), np.cumprod([0.9, 0.7, 0.5]), rtol=1e-12)
    x0, y = torch.rand(3, 2, 4, 4) * 2 - 1, torch.tensor([1, 2, 3])
    model, g = _Recorder(), torch.Generator().manual_seed(6)
    loss = ddpm.loss(model, x0, y, generator=g)
    again = torch.Generator().manual_seed(6)
    t = torch.randint(0, 1000, (3,), generator=again)
    noise = torch.randn(x0.shape, generator=again)
    ab = torch.from_numpy(want)[t].float().view(3, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    (x_seen, t_seen, y_seen, g_seen), = model.calls
    torch.testing.assert_close(x_seen, xt)
    assert torch.equal(t_seen.double(), t.double()) and torch.equal(y_seen, y) and g_seen is g
    torch.testing.assert_close(loss, ((model(xt, t.float(), y) - noise) ** 2).mean())


def test_get_objective():
    assert isinstance(get_objective("flow"), RectifiedFlow) and isinstance(get_objective("ddpm"), DDPM)
    with pytest.raises(ValueError, match="unknown objective 'edm'; choose 'flow' .* or 'ddpm'"):
        get_objective("edm")
