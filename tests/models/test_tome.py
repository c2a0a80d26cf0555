"""Token merging: r=0 is the plain model bit for bit; r>0 matches the ToMe authors' algorithm (ported below from
facebookresearch/ToMe `tome/merge.py` and `tome/patch/timm.py`, run on a timm model); merging keeps sizes
consistent and the class token in place."""
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


def _ref_forward(model, x, r):
    """timm ViT forward with ToMe's ToMeBlock / ToMeAttention (explicit softmax + log-size bias)."""
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
        merge = _ref_matching(k.mean(1), r)
        if size is None:
            size = torch.ones_like(x[..., 0, None])
        x = merge(x * size, mode="sum")
        size = merge(size, mode="sum")
        x = x / size
        x = x + blk.mlp(blk.norm2(x))
    return model.forward_head(model.norm(x))


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


def test_register_tokens_and_avg_pool_and_remove():
    ours = create_model("vit_tiny_patch16_224", reg_tokens=4, global_pool="avg").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        plain = ours(x)
        apply_tome(ours, 8)
        merged = ours(x)
        assert merged.shape == plain.shape and torch.isfinite(merged).all()
        assert not torch.equal(merged, plain)
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
