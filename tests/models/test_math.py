"""The ViT's math against direct formulas, on tiny models in float64: the whole forward written out from the
parameters (patchify by unfold, softmax(QK^T/sqrt d)V per head, LayerScale, pre-norm residuals, pooling), each
layer on its own, the initialisation, the model interface, and the analytic counts against hand counts."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkit.models import (VisionTransformer, ViTConfig, count_flops, count_params, create_model, get_config,
                           list_models, register)
from vitkit.models import config as config_module
from vitkit.models.layers import feature_take_indices, resample_abs_pos_embed, resample_patch_embed, to_2tuple
from vitkit.models.vit import (Attention, Block, ConvStem, DropPath, LayerScale, Mlp, PatchDropout, PatchEmbed,
                               conv_stem_channels)

TINY = dict(img_size=8, patch_size=2, embed_dim=8, depth=2, num_heads=2, num_classes=3)


def _tiny(**kw):
    return create_model(**{**TINY, **kw})


def _randomized(model, seed=0):
    """Every parameter random (norm scales around 1), in float64, so that any swapped or skipped term shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "norm" in name and "weight" in name else 0.0))
    return model.double().eval()


def _ln(x, norm, eps):
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, eps)


def _ref_attention(attn, x, eps, bias=None):
    """softmax(Q K^T / sqrt(Dh) + bias) V per head, heads side by side, then the output projection."""
    B, N, D = x.shape
    h = attn.num_heads
    dh = D // h
    qkv = x @ attn.qkv.weight.T + (attn.qkv.bias if attn.qkv.bias is not None else 0)
    q, k, v = (qkv[..., i * D:(i + 1) * D].reshape(B, N, h, dh).transpose(1, 2) for i in range(3))
    if isinstance(attn.q_norm, nn.LayerNorm):
        q, k = _ln(q, attn.q_norm, eps), _ln(k, attn.k_norm, eps)
    logits = q @ k.transpose(-1, -2) / math.sqrt(dh)
    if bias is not None:
        logits = logits + bias
    probs = torch.exp(logits - logits.amax(-1, keepdim=True))
    probs = probs / probs.sum(-1, keepdim=True)
    out = (probs @ v).transpose(1, 2).reshape(B, N, D)
    return out @ attn.proj.weight.T + attn.proj.bias, probs


def _ref_features(m, x):
    """The ViT's tokens after the final norm, written out from the parameters; also every block's attention."""
    cfg = m.config
    eps = cfg.norm_eps
    p = cfg.patch_size
    B, _, hh, ww = x.shape
    proj = m.patch_embed.proj
    patches = F.unfold(x, p, stride=p).transpose(1, 2)  # (B, L, C*p*p), row-major over the grid
    tok = patches @ proj.weight.reshape(proj.weight.shape[0], -1).T
    if proj.bias is not None:
        tok = tok + proj.bias
    gh, gw = cfg.grid_size
    pos = m.pos_embed
    n_pos_prefix = 0 if cfg.no_embed_class else int(cfg.class_token) + cfg.reg_tokens
    if (hh // p, ww // p) != (gh, gw):  # bicubic with antialias over the grid, in float32, as timm
        grid = pos[:, n_pos_prefix:].float().reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(hh // p, ww // p), mode="bicubic", antialias=True)
        pos = torch.cat([pos[:, :n_pos_prefix], grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1]).double()], 1)
    prefix = []
    if cfg.class_token:
        prefix.append(m.cls_token.expand(B, -1, -1))
    if cfg.reg_tokens:
        prefix.append(m.reg_token.expand(B, -1, -1))
    if cfg.no_embed_class:
        tok = torch.cat(prefix + [tok + pos], 1)
    else:
        tok = torch.cat(prefix + [tok], 1) + pos
    if cfg.pre_norm:
        tok = _ln(tok, m.norm_pre, eps)
    attns = []
    for blk in m.blocks:
        a, probs = _ref_attention(blk.attn, _ln(tok, blk.norm1, eps), eps)
        attns.append(probs)
        tok = tok + (a * blk.ls1.gamma if cfg.init_values else a)
        mlp = blk.mlp
        y = F.gelu(_ln(tok, blk.norm2, eps) @ mlp.fc1.weight.T + mlp.fc1.bias) @ mlp.fc2.weight.T + mlp.fc2.bias
        tok = tok + (y * blk.ls2.gamma if cfg.init_values else y)
    if isinstance(m.norm, nn.LayerNorm):
        tok = _ln(tok, m.norm, eps)
    return tok, attns


def _ref_head(m, tok):
    """(pooled and normed features, logits) from the final tokens."""
    cfg = m.config
    npt = int(cfg.class_token) + cfg.reg_tokens
    pooled = {"token": lambda t: t[:, 0], "avg": lambda t: t[:, npt:].mean(1), "": lambda t: t}[m.global_pool](tok)
    if isinstance(m.fc_norm, nn.LayerNorm):
        pooled = _ln(pooled, m.fc_norm, cfg.norm_eps)
    return pooled, (pooled @ m.head.weight.T + m.head.bias if isinstance(m.head, nn.Linear) else pooled)


CONFIGS = {
    "token": dict(),
    "avg-registers": dict(global_pool="avg", class_token=False, reg_tokens=2),
    "no-embed-class": dict(reg_tokens=1, no_embed_class=True, init_values=0.5, qk_norm=True, qkv_bias=False),
    "pre-norm-fc-norm": dict(pre_norm=True, fc_norm=True, mlp_ratio=2.5, norm_eps=0.1),
    "no-pool-no-head": dict(global_pool="", num_classes=0, norm_eps=0.05),
    "gray-wide": dict(in_chans=1, img_size=(8, 12), global_pool="avg", fc_norm=False, reg_tokens=1, depth=3),
}


@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS.keys())
def test_forward_is_the_vit_equations(kw):
    m = _randomized(_tiny(**kw))
    cfg = m.config
    h, w = to_2tuple(cfg.img_size)
    x = torch.randn(2, cfg.in_chans, h, w, dtype=torch.float64)
    with torch.no_grad():
        tok, attns = _ref_features(m, x)
        torch.testing.assert_close(m.forward_features(x), tok, rtol=1e-9, atol=1e-9)
        features, logits = _ref_head(m, tok)
        torch.testing.assert_close(m(x), logits, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(m.forward_head(tok, pre_logits=True), features, rtol=1e-9, atol=1e-9)
        got_logits, got = m(x, return_attention=True)
        torch.testing.assert_close(got_logits, logits, rtol=1e-9, atol=1e-9)
        assert len(got) == cfg.depth
        for a, b in zip(got, attns):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        # another runtime size: position embeddings resampled on the fly
        x2 = torch.randn(1, cfg.in_chans, h + 4, w - 2, dtype=torch.float64)
        torch.testing.assert_close(m.forward_features(x2), _ref_features(m, x2)[0], rtol=1e-6, atol=1e-6)
    assert all(n.eps == cfg.norm_eps for n in m.modules() if isinstance(n, nn.LayerNorm))


def test_model_structure_follows_the_config():
    m = _tiny(reg_tokens=2, mlp_ratio=2.5, drop_rate=0.1, pos_drop_rate=0.2, proj_drop_rate=0.3,
                     attn_drop_rate=0.4, drop_path_rate=0.5, depth=3, qkv_bias=False, qk_norm=True,
                     init_values=0.25)
    assert (m.num_classes, m.global_pool, m.num_features, m.embed_dim, m.in_chans) == (3, "token", 8, 8, 3)
    assert (m.num_reg_tokens, m.num_prefix_tokens, m.has_class_token, m.no_embed_class) == (2, 3, True, False)
    assert m.grad_checkpointing is False
    assert m.pos_embed.shape == (1, 3 + 16, 8) and m.cls_token.shape == (1, 1, 8) and m.reg_token.shape == (1, 2, 8)
    assert m.patch_embed.proj.bias is not None and isinstance(m.norm_pre, nn.Identity)
    assert m.pos_drop.p == 0.2 and m.head_drop.p == 0.1
    assert isinstance(m.norm, nn.LayerNorm) and isinstance(m.fc_norm, nn.Identity)
    assert isinstance(m.head, nn.Linear) and m.head.weight.shape == (3, 8)
    for i, blk in enumerate(m.blocks):
        assert blk.attn.num_heads == 2 and blk.attn.head_dim == 4 and blk.attn.scale == 0.5
        assert blk.attn.qkv.bias is None and blk.attn.qkv.weight.shape == (24, 8)
        assert isinstance(blk.attn.q_norm, nn.LayerNorm) and blk.attn.q_norm.normalized_shape == (4,)
        assert blk.attn.attn_drop.p == 0.4 and blk.attn.proj_drop.p == 0.3
        assert blk.mlp.fc1.weight.shape == (20, 8) and blk.mlp.drop1.p == 0.3 and blk.mlp.drop2.p == 0.3
        assert isinstance(blk.mlp.act, nn.GELU) and blk.mlp.act.approximate == "none"
        assert torch.equal(blk.ls1.gamma, torch.full((8,), 0.25)) and torch.equal(blk.ls2.gamma, blk.ls1.gamma)
        # stochastic depth rises linearly from 0 (no DropPath at all) to drop_path_rate in the last block
        for dp in (blk.drop_path1, blk.drop_path2):
            if i == 0:
                assert isinstance(dp, nn.Identity)
            else:
                assert isinstance(dp, DropPath) and math.isclose(dp.drop_prob, 0.25 * i, rel_tol=1e-6)
    plain = _tiny()
    assert isinstance(plain.blocks[0].ls1, nn.Identity) and plain.reg_token is None
    assert isinstance(plain.blocks[0].attn.q_norm, nn.Identity) and plain.blocks[0].attn.qkv.bias is not None
    pre = _tiny(pre_norm=True, global_pool="avg", class_token=False, num_classes=0)
    assert pre.patch_embed.proj.bias is None and isinstance(pre.norm_pre, nn.LayerNorm)
    assert isinstance(pre.fc_norm, nn.LayerNorm) and isinstance(pre.norm, nn.Identity)
    assert isinstance(pre.head, nn.Identity) and pre.cls_token is None and pre.num_prefix_tokens == 0
    assert pre.pos_embed.shape == (1, 16, 8)
    nec = _tiny(reg_tokens=2, no_embed_class=True)
    assert nec.pos_embed.shape == (1, 16, 8) and nec.num_prefix_tokens == 3
    assert isinstance(_tiny(global_pool="avg", fc_norm=False).norm, nn.LayerNorm)
    assert isinstance(_tiny(fc_norm=True).fc_norm, nn.LayerNorm)
    pd = _tiny(reg_tokens=1, patch_drop_rate=0.25).patch_drop
    assert isinstance(pd, PatchDropout) and pd.prob == 0.25 and pd.num_prefix_tokens == 2
    assert isinstance(plain.patch_drop, nn.Identity)  # off: no module in the way, as timm
    one = _tiny(num_classes=1)
    assert isinstance(one.head, nn.Linear) and one.head.out_features == 1


def test_model_refuses_bad_pooling():
    with pytest.raises(ValueError, match="global_pool must be 'token', 'avg' or '', got 'max'"):
        _tiny(global_pool="max")
    with pytest.raises(ValueError, match="global_pool='token' needs class_token=True; use global_pool='avg'"):
        _tiny(class_token=False)
    m = _tiny(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="global_pool must be 'token', 'avg' or '', got 'max'"):
        m.reset_classifier(2, global_pool="max")
    with pytest.raises(ValueError, match="global_pool='token' needs a class token"):
        m.reset_classifier(2, global_pool="token")
    assert VisionTransformer(**TINY).config == ViTConfig(**TINY)  # keyword arguments alone
    assert VisionTransformer(ViTConfig(**TINY), depth=1).config == ViTConfig(**{**TINY, "depth": 1})


# ---- the layers one by one -----------------------------------------------------------------------------------
def test_building_blocks_default_to_timms_vit_base():
    pe = PatchEmbed()
    assert (pe.img_size, pe.patch_size, pe.in_chans, pe.proj.out_channels) == ((224, 224), (16, 16), 3, 768)
    assert pe.dynamic_img_pad is False and pe.backbone is None and pe.proj.bias is not None
    attn = Attention(16)
    assert attn.num_heads == 8 and attn.qkv.bias is not None and isinstance(attn.q_norm, nn.Identity)
    assert attn.attn_drop.p == 0.0 and attn.proj_drop.p == 0.0
    blk = Block(16, 2, norm_layer=nn.LayerNorm)
    assert blk.mlp.fc1.out_features == 64 and blk.attn.qkv.bias is not None
    assert isinstance(blk.attn.q_norm, nn.Identity) and isinstance(blk.ls1, nn.Identity)
    assert blk.attn.attn_drop.p == 0.0 and blk.attn.proj_drop.p == 0.0 and blk.mlp.drop1.p == 0.0
    assert isinstance(blk.drop_path1, nn.Identity) and isinstance(blk.mlp.act, nn.GELU)
    assert Mlp(4, 8).drop1.p == 0.0 and Mlp(4, 8).drop2.p == 0.0
    assert DropPath().drop_prob == 0.0
    ls = Block(8, 2, init_values=0.25, norm_layer=nn.LayerNorm)
    assert torch.equal(ls.ls1.gamma, torch.full((8,), 0.25)) and torch.equal(ls.ls2.gamma, ls.ls1.gamma)


def _rand_linear(m, g):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


@pytest.mark.parametrize("qk_norm,qkv_bias", [(False, True), (True, False)])
def test_attention_is_softmax_qk_v_per_head(qk_norm, qkv_bias):
    g = torch.Generator().manual_seed(0)
    attn = _rand_linear(Attention(12, 3, qkv_bias=qkv_bias, qk_norm=qk_norm,
                                  norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6)).double().eval(), g)
    x = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
    bias = torch.randn(2, 1, 1, 5, generator=g, dtype=torch.float64)  # e.g. ToMe's log-size, per key
    with torch.no_grad():
        want, probs = _ref_attention(attn, x, 1e-6)
        torch.testing.assert_close(attn(x), want, rtol=1e-10, atol=1e-10)
        out, a = attn(x, return_attention=True)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a, probs, rtol=1e-10, atol=1e-10)
        want_b, probs_b = _ref_attention(attn, x, 1e-6, bias)
        torch.testing.assert_close(attn(x, bias), want_b, rtol=1e-10, atol=1e-10)
        out, a = attn(x, bias, return_attention=True)
        torch.testing.assert_close(out, want_b, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a, probs_b, rtol=1e-10, atol=1e-10)
    assert attn.scale == 0.5 and not isinstance(attn(x), tuple)
    with pytest.raises(ValueError, match="embed_dim 10 is not divisible by num_heads 3"):
        Attention(10, 3)


def test_attention_dropout_only_while_training():
    torch.manual_seed(0)
    attn = Attention(8, 2, attn_drop=0.5).eval()
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        plain = Attention(8, 2).eval()
        plain.load_state_dict(attn.state_dict())
        assert torch.equal(attn(x), plain(x))
        torch.testing.assert_close(attn(x, return_attention=True)[0], plain(x))
        attn.train()
        assert not torch.allclose(attn(x), plain(x), atol=1e-4)
        assert not torch.allclose(attn(x, return_attention=True)[0], plain(x), atol=1e-4)
        plain.train()  # no dropout configured: training changes nothing
        torch.testing.assert_close(plain(x), plain.eval()(x))
    proj_drop = Attention(8, 2, proj_drop=0.5).train()
    with torch.no_grad():
        assert (proj_drop(x) == 0).float().mean() > 0.2  # dropout after the projection zeroes outputs


def test_mlp_layerscale_and_block():
    g = torch.Generator().manual_seed(1)
    mlp = _rand_linear(Mlp(6, 10).double(), g)
    x = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        want = F.gelu(x @ mlp.fc1.weight.T + mlp.fc1.bias) @ mlp.fc2.weight.T + mlp.fc2.bias
        torch.testing.assert_close(mlp(x), want, rtol=1e-12, atol=1e-12)
    assert mlp.fc1.out_features == 10 and mlp.fc2.out_features == 6 and mlp.drop1.p == 0.0
    assert torch.equal(LayerScale(4).gamma, torch.full((4,), 1e-5))
    ls = LayerScale(3, 0.5)
    assert torch.equal(ls(torch.ones(2, 3)), torch.full((2, 3), 0.5))
    norm = lambda d: nn.LayerNorm(d, eps=1e-6)  # noqa: E731
    blk = _rand_linear(Block(8, 2, mlp_ratio=2.0, init_values=0.1, norm_layer=norm).double().eval(), g)
    x = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        a, probs = _ref_attention(blk.attn, _ln(x, blk.norm1, 1e-6), 1e-6)
        y = x + a * blk.ls1.gamma
        want = y + blk.mlp(_ln(y, blk.norm2, 1e-6)) * blk.ls2.gamma
        torch.testing.assert_close(blk(x), want, rtol=1e-10, atol=1e-10)
        out, attn = blk.forward_with_attention(x)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(attn, probs, rtol=1e-10, atol=1e-10)
        bias = torch.zeros(2, 1, 1, 5, dtype=torch.float64)
        bias[..., 0] = -1e9  # the bias reaches the attention: nobody attends to token 0 any more
        assert not torch.allclose(blk(x, bias), want)


def test_drop_path_drops_whole_samples_and_rescales():
    x = torch.ones(4000, 3, 2)
    dp = DropPath(0.25)
    assert dp.extra_repr() == "drop_prob=0.25"
    assert dp.eval()(x) is x and DropPath(0.0).train()(x) is x
    torch.manual_seed(0)
    y = dp.train()(x)
    per_sample = y.flatten(1)
    # all or nothing per sample, the kept ones scaled by 1/keep
    assert ((per_sample == 0).all(1) | torch.isclose(per_sample, torch.tensor(1 / 0.75)).all(1)).all()
    kept = (per_sample[:, 0] > 0).float().mean().item()
    assert abs(kept - 0.75) < 0.03 and abs(y.mean().item() - 1.0) < 0.05


def test_patch_dropout():
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=f"patch_drop_rate must be in \\[0, 1\\), got {bad}"):
            PatchDropout(bad)
    x = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)
    pd = PatchDropout(0.5, num_prefix_tokens=1)
    assert pd.extra_repr() == "prob=0.5" and PatchDropout().prob == 0.5 and PatchDropout().num_prefix_tokens == 1
    assert pd.eval()(x) is x and PatchDropout(0.0).train()(x) is x
    torch.manual_seed(0)
    y = pd.train()(x)
    assert y.shape == (2, 1 + 3, 3) and torch.equal(y[:, 0], x[:, 0])  # int(6 * 0.5) = 3 patches kept
    for b in range(2):
        rows = {tuple(r) for r in x[b, 1:].tolist()}
        assert all(tuple(r) in rows for r in y[b, 1:].tolist()) and len({tuple(r) for r in y[b, 1:].tolist()}) == 3
    no_prefix = PatchDropout(0.9, num_prefix_tokens=0).train()
    y = no_prefix(x)
    assert y.shape == (2, 1, 3)  # at least one token stays; no prefix to put back
    assert all(tuple(y[b, 0].tolist()) in {tuple(r) for r in x[b].tolist()} for b in range(2))


def test_patch_embed_is_a_patchify_linear_map():
    g = torch.Generator().manual_seed(2)
    pe = _rand_linear(PatchEmbed((8, 12), 2, 3, 5).double(), g)
    assert pe.grid_size == (4, 6) and pe.num_patches == 24 and pe.img_size == (8, 12) and pe.patch_size == (2, 2)
    x = torch.randn(2, 3, 8, 12, generator=g, dtype=torch.float64)
    with torch.no_grad():
        want = F.unfold(x, 2, stride=2).transpose(1, 2) @ pe.proj.weight.reshape(5, -1).T + pe.proj.bias
        torch.testing.assert_close(pe(x), want.reshape(2, 4, 6, 5), rtol=1e-12, atol=1e-12)
    assert pe.dynamic_feat_size((9, 13)) == (4, 6)
    pad = _rand_linear(PatchEmbed(8, 2, 3, 5, dynamic_img_pad=True).double(), g)
    assert pad.dynamic_feat_size((9, 13)) == (5, 7) and pad.dynamic_feat_size((8, 12)) == (4, 6)
    x = torch.randn(1, 3, 9, 13, generator=g, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(pad(x), pad.proj(F.pad(x, (0, 1, 0, 1))).permute(0, 2, 3, 1))  # zeros right, bottom
        assert pad(x[..., :8, :12]).shape == (1, 4, 6, 5)  # a multiple of the patch: no padding
        x = x[..., :12]  # only the height needs padding
        torch.testing.assert_close(pad(x), pad.proj(F.pad(x, (0, 0, 0, 1))).permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="stem must be 'patch' or 'conv', got 'resnet'"):
        PatchEmbed(8, 2, 3, 5, stem="resnet")


@pytest.mark.parametrize("shape,match", [
    ((3, 8, 8), r"rank 3 with shape \(3, 8, 8\); add a batch dimension with x.unsqueeze\(0\)"),
    ((1, 1, 8, 8), r"expected 3 input channel\(s\), got 1 .*build the model with in_chans=1"),
    ((1, 3, 8, 9), r"image size 8x9 is not a multiple of the patch size 2x2; .*dynamic_img_pad=True"),
    ((1, 3, 7, 8), r"image size 7x8 is not a multiple"),
])
def test_patch_embed_input_checks(shape, match):
    with pytest.raises(ValueError, match=match):
        PatchEmbed(8, 2, 3, 5)(torch.randn(*shape))


def test_patch_embed_set_input_size_flexivit():
    g = torch.Generator().manual_seed(3)
    pe = _rand_linear(PatchEmbed(8, 2, 3, 5).double(), g)
    old_w, old_b, old_proj = pe.proj.weight.detach().clone(), pe.proj.bias.detach().clone(), pe.proj
    pe.set_input_size(patch_size=2)
    assert pe.proj is old_proj  # the same size: nothing changes
    pe.set_input_size(img_size=(12, 16), patch_size=4)
    assert pe.patch_size == (4, 4) and pe.img_size == (12, 16) and pe.grid_size == (3, 4)
    assert pe.proj.kernel_size == (4, 4) and pe.proj.stride == (4, 4) and pe.proj.weight.dtype == torch.float64
    torch.testing.assert_close(pe.proj.weight, resample_patch_embed(old_w, (4, 4)), rtol=0, atol=0)
    assert torch.equal(pe.proj.bias, old_b)
    nobias = PatchEmbed(8, 2, 3, 5, bias=False)
    nobias.set_input_size(patch_size=4)
    assert nobias.proj.bias is None
    conv = PatchEmbed(8, 2, 3, 8, stem="conv")
    with pytest.raises(ValueError, match="a convolutional stem's stride is fixed by its layers"):
        conv.set_input_size(patch_size=4)
    conv.set_input_size(img_size=16, patch_size=2)  # the same patch size is fine
    assert conv.img_size == (16, 16)


def test_conv_stem_layout():
    assert conv_stem_channels(16, 64) == (8, 16, 32, 64)
    assert conv_stem_channels(8, 48) == (12, 24, 48)
    assert conv_stem_channels(16, 16) == (8, 8, 8, 16)  # never narrower than 8
    assert conv_stem_channels(2, 5) == (8,)
    assert conv_stem_channels(4, 64, [16.0, 32]) == (16, 32)
    assert all(type(c) is int for c in conv_stem_channels(4, 64, [16.0, 32]))
    for p in (1, 3, 6, 0):
        with pytest.raises(ValueError, match=f"power of two \\(2, 4, 8, 16\\), got {p}; use stem='patch'"):
            conv_stem_channels(p, 64)
    with pytest.raises(ValueError, match=r"stem_channels \(8,\) must give at least one width per stride-2 conv: 2 for patch 4"):
        conv_stem_channels(4, 64, (8,))
    stem = ConvStem(3, (4, 6, 8))
    assert stem.out_channels == 8 and len(stem) == 3
    for i, (m, c_in, c_out) in enumerate(zip(stem, (3, 4, 6), (4, 6, 8))):
        conv = m.conv
        assert (conv.in_channels, conv.out_channels) == (c_in, c_out)
        assert conv.kernel_size == (3, 3) and conv.stride == (2, 2) and conv.padding == (1, 1)
        last = i == 2
        assert (conv.bias is not None) == last  # BN follows all but the last conv, which keeps its bias
        assert isinstance(m.bn, nn.BatchNorm2d) != last and isinstance(m.act, nn.ReLU) != last
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        stem.eval()
        y = stem[0].act(stem[0].bn(stem[0].conv(x)))
        torch.testing.assert_close(stem[0](x), y)
        assert (stem[0](x) >= 0).all() and (stem[2](torch.randn(1, 6, 4, 4)) < 0).any()
        assert stem(x).shape == (1, 8, 2, 2)
    pe = PatchEmbed(16, 8, 3, 32, stem="conv", stem_channels=(8, 16, 24))
    assert pe.proj.kernel_size == (1, 1) and pe.proj.in_channels == 24 and pe(torch.randn(1, 3, 16, 16)).shape == \
        (1, 2, 2, 32)


# ---- the model interface -------------------------------------------------------------------------------------
def _chain(m, x):
    """forward_features step by step through the model's own modules."""
    with torch.no_grad():
        t = m.embed(x)
        outs = []
        for blk in m.blocks:
            t = blk(t)
            outs.append(t)
        return outs


def test_pos_embed_prefix_and_pooling():
    for kw in (dict(reg_tokens=2), dict(reg_tokens=2, no_embed_class=True), dict(class_token=False,
                                                                                   global_pool="avg")):
        m = _randomized(_tiny(**kw))
        tokens = torch.randn(2, 4, 4, 8, dtype=torch.float64)
        prefix = [t.expand(2, -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
        with torch.no_grad():
            if m.no_embed_class:
                want = torch.cat(prefix + [tokens.reshape(2, 16, 8) + m.pos_embed], 1)
            else:
                want = torch.cat(prefix + [tokens.reshape(2, 16, 8)], 1) + m.pos_embed
            assert torch.equal(m._pos_embed(tokens), want)
        t = torch.randn(2, 5, 8, dtype=torch.float64)
        assert torch.equal(m.pool(t), t[:, 0] if m.global_pool == "token" else t[:, m.num_prefix_tokens:].mean(1))
    m.global_pool = ""
    assert m.pool(t) is t


def test_forward_intermediates():
    m = _randomized(_tiny(depth=3, reg_tokens=1))
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    outs = _chain(m, x)
    with torch.no_grad():
        final, maps = m.forward_intermediates(x, indices=2)
        torch.testing.assert_close(final, m.forward_features(x))
        assert len(maps) == 2
        for got, want in zip(maps, outs[1:]):  # the last two blocks, patch tokens as (B, D, H', W')
            assert torch.equal(got, want[:, 2:].reshape(2, 4, 6, 8).permute(0, 3, 1, 2))
        _, maps = m.forward_intermediates(x, indices=[0, -1], output_fmt="NLC", norm=True)
        assert torch.equal(maps[0], m.norm(outs[0])[:, 2:]) and torch.equal(maps[1], m.norm(outs[2])[:, 2:])
        maps = m.forward_intermediates(x, indices=[1], return_prefix_tokens=True, intermediates_only=True)
        assert len(maps) == 1 and torch.equal(maps[0][1], outs[1][:, :2])
        maps = m.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)  # None: every block
        assert len(maps) == 3 and all(torch.equal(a, b[:, 2:]) for a, b in zip(maps, outs))
        calls = []
        hooks = [b.register_forward_hook(lambda *a: calls.append(1)) for b in m.blocks]
        final, _ = m.forward_intermediates(x, indices=[0], stop_early=True)
        assert len(calls) == 1 and torch.equal(final, m.norm(outs[0]))
        final, _ = m.forward_intermediates(x, indices=[0])  # by default every block runs
        assert len(calls) == 4 and torch.equal(final, m.norm(outs[2]))
        for h in hooks:
            h.remove()
        m.set_grad_checkpointing()
        assert m.grad_checkpointing is True
        final, maps = m.forward_intermediates(x, indices=1)
        torch.testing.assert_close(maps[0], outs[2][:, 2:].reshape(2, 4, 6, 8).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC', got 'NHWC'"):
        m.forward_intermediates(x, output_fmt="NHWC")
    no_prefix = _randomized(_tiny(class_token=False, global_pool="avg"))
    maps = no_prefix.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
    assert isinstance(maps[0], torch.Tensor)  # nothing to pair with
    pad = _randomized(_tiny(dynamic_img_pad=True))
    _, maps = pad.forward_intermediates(torch.randn(1, 3, 7, 9, dtype=torch.float64), indices=1)
    assert maps[0].shape == (1, 8, 4, 5)


def test_grad_checkpointing_runs_each_block_through_checkpoint(monkeypatch):
    from vitkit.models import vit

    m = _tiny()
    x = torch.randn(2, 3, 8, 8)
    seen = []
    real = vit.checkpoint
    monkeypatch.setattr(vit, "checkpoint", lambda fn, *a, **k: seen.append(fn) or real(fn, *a, **k))
    m.set_grad_checkpointing(True)
    want = m.forward_features(x)
    assert seen == list(m.blocks)
    with torch.no_grad():
        seen.clear()
        torch.testing.assert_close(m.forward_features(x), want)
        assert seen == []  # nothing to recompute without autograd
    seen.clear()
    _, maps = m.forward_intermediates(x, indices=1)
    assert seen == list(m.blocks)
    with torch.no_grad():
        torch.testing.assert_close(maps[0], m.forward_intermediates(x, indices=1)[1][0])
    m.set_grad_checkpointing(False)
    seen.clear()
    m.forward_features(x)
    m.forward_intermediates(x)
    assert seen == []


def test_grad_checkpointing_works_with_autograd_grad():
    """Non-reentrant checkpointing: torch.autograd.grad (gradient penalties, meta-learning) gives the plain grads."""
    m = _tiny(depth=3)
    x = torch.randn(2, 3, 8, 8)
    params = list(m.parameters())

    def grads(fn):
        return torch.autograd.grad(fn().pow(2).sum(), params, allow_unused=True)

    want = grads(lambda: m.forward_features(x))
    want_maps = grads(lambda: m.forward_intermediates(x, indices=1)[1][0])
    m.set_grad_checkpointing(True)
    for got, ref in ((grads(lambda: m.forward_features(x)), want),
                     (grads(lambda: m.forward_intermediates(x, indices=1)[1][0]), want_maps)):
        for a, b in zip(got, ref):
            assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-6))


def test_init_weights():
    torch.manual_seed(0)
    m = create_model(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=10, reg_tokens=2,
                     init_values=0.3)
    assert 0.015 < m.pos_embed.std().item() < 0.025 and m.pos_embed.abs().max().item() < 0.1
    for tok in (m.cls_token, m.reg_token):
        assert 0 < tok.abs().max().item() < 1e-5
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            bound = math.sqrt(6 / (mod.in_features + mod.out_features))
            assert 0.9 * bound < mod.weight.abs().max().item() <= bound and torch.equal(mod.bias,
                                                                                        torch.zeros_like(mod.bias))
    w = m.patch_embed.proj.weight  # xavier over the flattened patch: fan_in C*p*p, fan_out D
    bound = math.sqrt(6 / (3 * 16 + 64))
    assert 0.9 * bound < w.abs().max().item() <= bound
    assert all(torch.equal(ls.gamma, torch.full((64,), 0.3)) for b in m.blocks for ls in (b.ls1, b.ls2))
    t = create_model(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=10,
                     weight_init="timm")
    qkv = t.blocks[0].attn.qkv.weight
    assert 0.018 < qkv.std().item() < 0.022 and qkv.abs().max().item() < 0.1
    assert t.patch_embed.proj.weight.abs().max().item() <= 1 / math.sqrt(3 * 16)  # PyTorch's conv init, untouched
    assert torch.equal(t.blocks[0].mlp.fc1.bias, torch.zeros(256))
    c = create_model(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=4, stem="conv",
                     stem_channels=(32, 64))
    first, last = c.patch_embed.backbone[0].conv, c.patch_embed.backbone[1].conv
    assert abs(first.weight.std().item() / math.sqrt(2 / (32 * 9)) - 1) < 0.1  # He, fan_out
    assert abs(last.weight.std().item() / math.sqrt(2 / (64 * 9)) - 1) < 0.1
    assert torch.equal(last.bias, torch.zeros(64))
    torch.manual_seed(1)
    m.init_weights()  # xavier unless told otherwise
    w = m.blocks[0].mlp.fc1.weight
    bound = math.sqrt(6 / (64 + 256))
    assert 0.9 * bound < w.abs().max().item() <= bound
    with pytest.raises(ValueError, match="weight_init must be 'xavier' or 'timm', got 'zeros'"):
        _tiny(weight_init="zeros")


def test_head_interface_and_reset_classifier():
    m = _tiny(reg_tokens=1)
    assert m.no_weight_decay() == {"pos_embed", "cls_token", "reg_token"}
    assert m.get_classifier() is m.head
    m = m.double()
    torch.manual_seed(0)
    m.reset_classifier(500)
    assert m.head.weight.shape == (500, 8) and m.head.weight.dtype == torch.float64
    assert torch.equal(m.head.bias, torch.zeros(500, dtype=torch.float64))
    assert 0.017 < m.head.weight.std().item() < 0.023 and m.head.weight.abs().max() < 0.1
    assert m.num_classes == 500 and m.config.num_classes == 500 and m.config.fc_norm is False
    m.reset_classifier(0, global_pool="avg")
    assert isinstance(m.head, nn.Identity) and m.global_pool == "avg" and m.config.global_pool == "avg"
    assert m.config.num_classes == 0 and m.config.fc_norm is False
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.forward_features(x)[:, 2:].mean(1))
    again = VisionTransformer(m.config).double()
    again.load_state_dict(m.state_dict())  # the rebuilt model keeps the trained final norm where it was
    avg = _tiny(global_pool="avg", class_token=False)
    avg.reset_classifier(4)
    assert avg.config.fc_norm is True and avg.global_pool == "avg"
    avg.reset_classifier(1, global_pool="")  # no pooling, one output
    assert avg.global_pool == "" and isinstance(avg.head, nn.Linear) and avg.head.out_features == 1
    assert torch.equal(avg.head.bias, torch.zeros(1))
    avg.reset_classifier(2, global_pool="avg")  # a model without class token may average
    assert avg.global_pool == "avg"
    tok = _tiny(global_pool="avg")
    tok.reset_classifier(2, global_pool="token")  # one with a class token may read it
    assert tok.global_pool == "token" and tok.config.global_pool == "token"
    assert "config=custom img_size=8 patch_size=2" == m.extra_repr()
    assert create_model("vit_mini_patch7_28").extra_repr() == "config=vit_mini_patch7_28 img_size=28 patch_size=7"


def test_set_input_size_resamples_and_updates_the_config():
    for kw in (dict(reg_tokens=2), dict(reg_tokens=2, no_embed_class=True)):
        m = _randomized(_tiny(**kw))
        old = m.pos_embed.detach().clone()
        prefix = 0 if m.no_embed_class else 3
        m.pos_embed.requires_grad_(False)
        m.set_input_size(img_size=(12, 16))
        assert torch.equal(m.pos_embed, resample_abs_pos_embed(old, (6, 8), (4, 4), prefix))
        assert m.pos_embed.requires_grad is False and m.config.img_size == (12, 16)
        m.set_input_size(img_size=12)
        assert m.config.img_size == 12 and m.pos_embed.shape[1] == 36 + prefix
        same = m.pos_embed
        m.set_input_size(img_size=24, patch_size=4)  # the same 6x6 grid: the embedding stays as it is
        assert m.pos_embed is same and m.config.patch_size == 4 and m.config.img_size == 24
    m = _tiny()
    m.set_input_size(patch_size=4)
    assert m.pos_embed.requires_grad and m.pos_embed.shape == (1, 5, 8) and m.config.grid_size == (2, 2)
    wide = _randomized(_tiny(img_size=(8, 12)))  # a non-square grid is not inferred from the row count
    old = wide.pos_embed.detach().clone()
    wide.set_input_size(img_size=(12, 8))
    assert torch.equal(wide.pos_embed, resample_abs_pos_embed(old, (6, 4), (4, 6), 1))
    assert wide.config.img_size == (12, 8)


# ---- resampling ----------------------------------------------------------------------------------------------
def test_resample_abs_pos_embed_is_bicubic_interpolation_of_the_grid():
    g = torch.Generator().manual_seed(4)
    for prefix in (0, 1, 3):
        pe = torch.randn(1, prefix + 3 * 5, 6, generator=g)
        out = resample_abs_pos_embed(pe, (4, 7), (3, 5), prefix)
        grid = F.interpolate(pe[:, prefix:].reshape(1, 3, 5, 6).permute(0, 3, 1, 2), size=(4, 7), mode="bicubic",
                             antialias=True)
        want = torch.cat([pe[:, :prefix], grid.permute(0, 2, 3, 1).reshape(1, 28, 6)], 1)
        assert out.shape == (1, prefix + 28, 6) and torch.equal(out, want)
    sq = torch.randn(1, 1 + 16, 6, generator=g)  # a square grid is inferred; the class row is the default prefix
    assert torch.equal(resample_abs_pos_embed(sq, (2, 3)), resample_abs_pos_embed(sq, (2, 3), (4, 4), 1))
    assert torch.equal(resample_abs_pos_embed(sq[:, 1:], (5, 5), num_prefix_tokens=0),
                       resample_abs_pos_embed(sq[:, 1:], (5, 5), (4, 4), 0))
    assert resample_abs_pos_embed(sq, [4, 4]) is sq  # the same grid: untouched
    bl = resample_abs_pos_embed(sq, (2, 3), interpolation="bilinear", antialias=False)
    want = F.interpolate(sq[:, 1:].reshape(1, 4, 4, 6).permute(0, 3, 1, 2), size=(2, 3), mode="bilinear")
    assert torch.equal(bl[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 6, 6))
    d = resample_abs_pos_embed(sq[:, 1:].double(), (2, 3), num_prefix_tokens=0)  # computed in float32, returned
    assert d.dtype == torch.float64 and torch.equal(d.float(), resample_abs_pos_embed(sq[:, 1:], (2, 3), (4, 4), 0))
    many = torch.randn(1, 7 + 9, 6, generator=g)  # 7 prefix rows over a 3x3 grid: the grid is what is square
    assert torch.equal(resample_abs_pos_embed(many, (2, 2), num_prefix_tokens=7),
                       resample_abs_pos_embed(many, (2, 2), (3, 3), 7))


def test_resample_patch_embed_flexivit():
    """Upsampling a kernel by the pseudo-inverse keeps <resize(x), w'> = <x, w> for every patch x (FlexiViT)."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, 3, 2, 3, generator=g, dtype=torch.float64)  # a non-square kernel
    assert resample_patch_embed(w, (2, 3)) is w
    w2 = resample_patch_embed(w, (4, 5))
    assert w2.shape == (4, 3, 4, 5) and w2.dtype == torch.float64
    x = torch.randn(7, 3, 2, 3, generator=g)
    x2 = F.interpolate(x, size=(4, 5), mode="bicubic", antialias=True)
    torch.testing.assert_close(torch.einsum("bchw,dchw->bd", x2.double(), w2),
                               torch.einsum("bchw,dchw->bd", x.double(), w), rtol=1e-4, atol=1e-4)
    # the same for a resize with another interpolation, and independent of torch's default dtype
    w3 = resample_patch_embed(w.float(), (4, 6), interpolation="bilinear", antialias=False)
    x3 = F.interpolate(x, size=(4, 6), mode="bilinear")
    torch.testing.assert_close(torch.einsum("bchw,dchw->bd", x3, w3),
                               torch.einsum("bchw,dchw->bd", x, w.float()), rtol=1e-4, atol=1e-4)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.testing.assert_close(resample_patch_embed(w.float(), (4, 6), interpolation="bilinear",
                                                        antialias=False), w3)
    finally:
        torch.set_default_dtype(default)


def test_to_2tuple_and_feature_take_indices():
    assert to_2tuple(3) == (3, 3) and to_2tuple([4, 5.0]) == (4, 5) and to_2tuple((6, 7)) == (6, 7)
    assert all(type(v) is int for v in to_2tuple([4, 5.0]))
    with pytest.raises(ValueError, match=r"expected an int or a \(height, width\) pair, got \(1, 2, 3\)"):
        to_2tuple((1, 2, 3))
    assert feature_take_indices(4) == ([0, 1, 2, 3], 3)
    assert feature_take_indices(4, 4) == ([0, 1, 2, 3], 3) and feature_take_indices(4, 1) == ([3], 3)
    assert feature_take_indices(4, [0, -1, 2]) == ([0, 3, 2], 3) and feature_take_indices(4, (-4,)) == ([0], 0)
    for bad in (0, 5):
        with pytest.raises(ValueError, match=f"indices={bad}: must be between 1 and the depth \\(4\\)"):
            feature_take_indices(4, bad)
    for bad in (4, -5):
        with pytest.raises(ValueError, match=f"block index {bad} is out of range for a model of depth 4"):
            feature_take_indices(4, [bad])


# ---- configs and counts ----------------------------------------------------------------------------------------
def test_config_checks_and_round_trip():
    cfg = ViTConfig(**TINY)
    assert cfg.replace(depth=5).depth == 5 and cfg.depth == 2
    with pytest.raises(ValueError, match=r"unknown model option\(s\) \['dpeth'\]; known options: \[.*'depth'"):
        cfg.replace(dpeth=5)
    for kw, match in [(dict(num_heads=3), "embed_dim 8 must be divisible by num_heads 3"),
                      (dict(img_size=9), "img_size 9 must be a multiple of patch_size 2"),
                      (dict(img_size=(8, 9)), r"img_size \(8, 9\) must be a multiple"),
                      (dict(img_size=(9, 8)), r"img_size \(9, 8\) must be a multiple"),
                      (dict(in_chans=0), "in_chans must be >= 1, got 0"),
                      (dict(depth=0), "depth must be >= 1, got 0"), (dict(num_classes=-1), "num_classes must be >= 0"),
                      (dict(stem="vgg"), "stem must be 'patch' or 'conv', got 'vgg'"),
                      (dict(stem="conv", patch_size=3, img_size=9), "power of two"),
                      (dict(patch_drop_rate=1.0), r"patch_drop_rate must be in \[0, 1\), got 1.0"),
                      (dict(patch_drop_rate=-0.5), "patch_drop_rate")]:
        with pytest.raises(ValueError, match=match):
            cfg.replace(**kw).validate()
    with pytest.raises(ValueError, match="must give at least one width per stride-2 conv"):
        cfg.replace(stem="conv", patch_size=4, stem_channels=(8,)).validate()
    cfg.replace(stem="conv", stem_channels=(8, 16)).validate()  # more widths than halvings: stride-1 convs first
    for kw in (dict(in_chans=1, depth=1, num_classes=0), dict(patch_drop_rate=0.0), dict(stem="conv")):
        cfg.replace(**kw).validate()
    wide = cfg.replace(img_size=(8, 12), stem="conv", stem_channels=(8,))
    d = wide.to_dict()
    assert d["img_size"] == [8, 12] and d["stem_channels"] == [8] and d["depth"] == 2
    assert ViTConfig.from_dict(d) == wide and ViTConfig.from_dict({**d, "future_option": 1}) == wide
    assert ViTConfig.from_dict({"stem_channels": None}).stem_channels == ()
    assert ViTConfig.from_dict({"img_size": 32}).img_size == 32 and ViTConfig.from_dict({}) == ViTConfig()
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["img_size"] == 8
    assert wide.grid_size == (4, 6) and ViTConfig(img_size=(8, 12), patch_size=4).grid_size == (2, 3)


def test_registry(monkeypatch):
    monkeypatch.setattr(config_module, "_REGISTRY", dict(config_module._REGISTRY))
    cfg = register("vit_test_patch2_8", **TINY)
    assert cfg.name == "vit_test_patch2_8" and get_config("vit_test_patch2_8") is cfg
    assert get_config("vit_test_patch2_8", depth=3) == cfg.replace(depth=3)
    with pytest.raises(ValueError, match="must be divisible"):
        register("vit_bad", **{**TINY, "num_heads": 3})
    assert "vit_bad" not in list_models()
    names = list_models()
    assert names == sorted(names) and "vit_test_patch2_8" in names and len(names) > 30
    assert list_models("test") == ["vit_test_patch2_8"]
    assert list_models("vit_t?st_*") == ["vit_test_patch2_8"]
    assert list_models("vit_[t]est*") == ["vit_test_patch2_8"]
    assert list_models("patch2_") == ["vit_test_patch2_8"] and list_models("nothing") == []
    with pytest.raises(ValueError, match="unknown model 'vit_test_patch2_9'; did you mean vit_test_patch2_8"):
        get_config("vit_test_patch2_9")
    with pytest.raises(ValueError, match=r"did you mean vit_tiny_patch16_224, [a-z0-9_]+, [a-z0-9_]+\?$"):
        get_config("vit_tiny_patch16_22")  # the three closest names
    with pytest.raises(ValueError, match="unknown model 'zzz'; `vitkit models` lists them"):
        get_config("zzz")
    b = get_config("vit_base_patch16_224")
    assert (b.embed_dim, b.depth, b.num_heads, b.patch_size, b.img_size) == (768, 12, 12, 16, 224)


def _hand_macs(n_patch, n, d, f, depth, classes, patch_macs):
    return patch_macs + depth * (3 * n * d * d + 2 * n * n * d + n * d * d + 2 * n * d * f) + d * classes


def test_count_flops_by_hand():
    cfg = ViTConfig(**{**TINY, "mlp_ratio": 2.0, "reg_tokens": 1})
    macs = 16 * 3 * 4 * 8 + 2 * (18 * 8 * 24 + 2 * 18 * 18 * 8 + 18 * 8 * 8 + 2 * 18 * 8 * 16) + 8 * 3
    assert macs == 30360
    assert count_flops(cfg) == {"macs": 30360.0, "flops": 60720.0, "tokens": 18}
    # another input size (non-square), no class token, a fractional MLP ratio and one input channel
    cfg = ViTConfig(**{**TINY, "class_token": False, "global_pool": "avg", "mlp_ratio": 2.5, "in_chans": 1})
    got = count_flops(cfg, img_size=(8, 12))
    assert got["tokens"] == 24 and got["macs"] == _hand_macs(24, 24, 8, 20, 2, 3, 24 * 1 * 4 * 8)
    # the conv stem: each stride-2 3x3 conv at its output size (rounded up), then the 1x1 projection
    cfg = ViTConfig(img_size=(12, 20), patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=0,
                    stem="conv", stem_channels=(6, 10))
    stem = 6 * 10 * 3 * 9 * 6 + 3 * 5 * 6 * 9 * 10 + 15 * 10 * 16
    assert count_flops(cfg)["macs"] == _hand_macs(15, 16, 16, 64, 1, 0, stem)
    cfg = cfg.replace(img_size=(4, 4), patch_size=2, stem_channels=())  # default widths: (16,)
    assert count_flops(cfg)["macs"] == _hand_macs(4, 5, 16, 64, 1, 0, 2 * 2 * 3 * 9 * 16 + 4 * 16 * 16)


def test_count_flops_of_odd_sizes_is_what_runs():
    from torch.utils.flop_counter import FlopCounterMode

    def executed(m, x):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m(x, return_attention=True)  # the explicit softmax path, which the counter knows
        return counter.get_total_flops() / len(x)

    for kw, size in [(dict(stem="conv", patch_size=4, img_size=(12, 20), embed_dim=16), None),
                     (dict(img_size=(8, 12), mlp_ratio=2.5, reg_tokens=2, in_chans=1), (12, 8))]:
        cfg = ViTConfig(**{**TINY, **kw})
        m = VisionTransformer(cfg).eval()
        h, w = to_2tuple(size or cfg.img_size)
        assert executed(m, torch.randn(2, cfg.in_chans, h, w)) == count_flops(cfg, img_size=size)["flops"]


@pytest.mark.parametrize("kw", [
    dict(), dict(pre_norm=True), dict(qkv_bias=False, qk_norm=True), dict(init_values=0.1, reg_tokens=3),
    dict(reg_tokens=2, no_embed_class=True), dict(class_token=False, global_pool="avg", num_classes=0),
    dict(mlp_ratio=2.5, img_size=(8, 12), in_chans=1, fc_norm=True),
    dict(stem="conv", embed_dim=16, patch_size=4), dict(stem="conv", pre_norm=True, stem_channels=(4,)),
    dict(stem="conv", patch_size=4, stem_channels=(6, 10), no_embed_class=True, num_classes=0),
], ids=lambda kw: ",".join(kw) or "plain")
def test_count_params_is_the_built_model(kw):
    cfg = ViTConfig(**{**TINY, **kw})
    n = count_params(cfg)
    assert type(n) is int and n == sum(p.numel() for p in VisionTransformer(cfg).parameters())


def test_count_params_by_hand():
    # patch 3*4*8+8, cls 8, pos 17*8, per block: 2 norms 32, qkv 8*24+24, proj 72, mlp 8*32+32+32*8+8, head 8*3+3
    block = 32 + 216 + 72 + 552
    assert count_params(ViTConfig(**TINY)) == 104 + 8 + 136 + 2 * block + 16 + 27
    assert count_params(get_config("vit_base_patch16_224")) == 86567656
