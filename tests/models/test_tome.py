"""Token merging: r=0 is the plain model bit for bit; r>0 matches the ToMe authors' algorithm (ported below from
facebookresearch/ToMe `tome/merge.py` and `tome/patch/timm.py`, run on a timm model, and extended to register
tokens by keeping them out of the matching); merging keeps sizes consistent and the class token in place."""
import math

import pytest
import torch
from _reference import check_reference, randomize_

from vitkit.models import create_model
from vitkit.models.tome import ToMeVisionTransformer, apply_tome, bipartite_soft_matching, merge_wavg, remove_tome, \
    tome_flops

timm = pytest.importorskip("timm")


# ---- the reference: ToMe's own code (class token only), applied to a timm VisionTransformer ---------------------
def _ref_matching(metric, r):
    t = metric.shape[1]
    r = min(r, (t - 1) // 2)
    if r <= 0:
        return lambda x, mode="mean": x
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :].sort(dim=1)[0]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def _ref_features(model, x, r, reg=0):
    """timm ViT forward with ToMe's ToMeBlock / ToMeAttention (explicit softmax + log-size bias): the final tokens
    and their sizes. `reg` register tokens (after the class token) attend with size 1 but are set aside at every
    merge and put back after the class token unchanged: ToMe's matching never sees them, so they are never merged."""
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    size = None
    for blk in model.blocks:
        a = blk.attn
        h = blk.norm1(x)
        B, N, C = h.shape
        qkv = a.qkv(h).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * a.scale
        if size is not None:
            attn = attn + size.log()[:, None, None, :, 0]
        attn = attn.softmax(dim=-1)
        y = a.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        x = x + y
        if size is None:
            size = torch.ones_like(x[..., 0, None])
        regs, reg_size = x[:, 1:1 + reg], size[:, 1:1 + reg]

        def aside(t):  # class token + patches, registers left out
            return torch.cat([t[:, :1], t[:, 1 + reg:]], dim=1)

        merge = _ref_matching(aside(k.mean(1)), r)
        x = merge(aside(x) * aside(size), mode="sum")
        size = merge(aside(size), mode="sum")
        x = x / size
        x = torch.cat([x[:, :1], regs, x[:, 1:]], dim=1)
        size = torch.cat([size[:, :1], reg_size, size[:, 1:]], dim=1)
        x = x + blk.mlp(blk.norm2(x))
    return model.norm(x), size


def _ref_forward(model, x, r):
    return model.forward_head(_ref_features(model, x, r)[0])


def _pair(name="vit_tiny_patch16_224", **kw):
    ref = randomize_(timm.create_model(name, pretrained=False, **kw).eval())
    ours = create_model(name, **kw).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def test_r0_is_the_plain_model_bit_for_bit():
    _, ours = _pair()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        plain, plain_tokens = ours(x), ours.forward_features(x)
        apply_tome(ours, 0)
        assert isinstance(ours, ToMeVisionTransformer)
        assert torch.equal(ours(x), plain)
        assert torch.equal(ours.forward_features(x), plain_tokens)


@pytest.mark.parametrize("r", [4, 13, 40])
def test_matches_the_authors_tome_on_timm(r):
    ref, ours = _pair()
    x = torch.randn(2, 3, 224, 224)
    check_reference(ours, x)
    apply_tome(ours, r)
    with torch.no_grad():
        expected = _ref_forward(ref, x, r)
        got = ours(x)
        tokens = ours.forward_features(x)
    assert (expected - got).abs().max().item() <= 1e-4
    n = 197
    for _ in range(12):
        n -= min(r, (n - 1) // 2)
    assert tokens.shape == (2, n, 192)


def test_merge_keeps_total_size_and_protected_tokens():
    torch.manual_seed(1)
    x = torch.randn(3, 21, 8)
    for protected in (0, 1, 2, 5):
        merge, r = bipartite_soft_matching(x, 6, num_protected=protected)
        assert r == 6
        merged, size = merge_wavg(merge, x, None)
        assert merged.shape == (3, 15, 8) and size.shape == (3, 15, 1)
        assert torch.all(size.sum(dim=1) == 21)  # every patch is counted exactly once
        assert torch.equal(merged[:, :protected], x[:, :protected])  # prefix untouched, in order
        assert torch.all(size[:, :protected] == 1)
        # the size-weighted sum of the tokens is conserved by merging
        assert torch.allclose((merged * size).sum(1), x.sum(1), atol=1e-5)
    merge, r = bipartite_soft_matching(x, 100, num_protected=1)
    assert r == 10  # never more than half the mergeable tokens


@pytest.mark.parametrize("reg,pool", [(4, "token"), (2, "avg")])
def test_register_tokens_are_never_merged(reg, pool):
    """With register tokens, every token (registers included) and every size matches the reference that keeps the
    registers out of the matching; average pooling weighs each merged patch token by the patches it stands for."""
    ref, ours = _pair(reg_tokens=reg, global_pool=pool)
    x = torch.randn(2, 3, 224, 224)
    apply_tome(ours, 8)
    with torch.no_grad():
        tokens, size = _ref_features(ref, x, 8, reg)
        got_tokens, got_size = ours.forward_features_sizes(x)
        got = ours(x)
    assert got_tokens.shape == tokens.shape == (2, 197 + reg - 12 * 8, 192)
    assert torch.equal(got_size, size) and torch.all(got_size[:, :1 + reg] == 1)
    # realistic random weights make a residual stream of ~10-50: the tolerance is relative to its scale (fp32)
    tol = 1e-5 * tokens.abs().max().item()
    torch.testing.assert_close(got_tokens[:, 1:1 + reg], tokens[:, 1:1 + reg], atol=tol, rtol=0)  # the registers
    torch.testing.assert_close(got_tokens, tokens, atol=tol, rtol=0)
    if pool == "avg":
        p = 1 + reg
        expected = ref.head(ref.fc_norm((tokens[:, p:] * size[:, p:]).sum(1) / size[:, p:].sum(1)))
    else:
        expected = ref.forward_head(tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_remove_tome_restores_the_plain_model():
    ours = create_model("vit_tiny_patch16_224", reg_tokens=4, global_pool="avg").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        plain = ours(x)
        apply_tome(ours, 8)
        assert not torch.allclose(ours(x), plain, atol=1e-3)  # merging 96 of 196 patch tokens shows
        with pytest.raises(ValueError, match="remove_tome"):
            ours(x, return_attention=True)
        remove_tome(ours)
        assert type(ours).__name__ == "VisionTransformer"
        assert torch.equal(ours(x), plain)
    with pytest.raises(ValueError):
        apply_tome(ours, -1)
    with pytest.raises(ValueError):
        apply_tome(ours, [1, 2])


def test_flops_fall_with_r():
    ours = create_model("vit_base_patch16_224")
    full = tome_flops(ours)
    from vitkit.models import count_flops, get_config
    assert abs(full - count_flops(get_config("vit_base_patch16_224"))["flops"]) / full < 0.01
    apply_tome(ours, 16)
    assert tome_flops(ours) < 0.55 * full
