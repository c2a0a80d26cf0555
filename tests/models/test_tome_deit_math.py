"""Token merging and the distilled DeiT against their definitions on tiny models: the matching's edge cases
(nothing to merge, many protected tokens), per-block schedules, size-weighted pooling, dropout, the analytic FLOPs
by hand; DeiT's two heads averaged, its checks and its classifier reset."""
import math

import pytest
import torch
import torch.nn as nn

from vitkit.models import create_model
from vitkit.models.deit import VisionTransformerDistilled
from vitkit.models.tome import (ToMeVisionTransformer, apply_tome, bipartite_soft_matching, merge_wavg, parse_r,
                                tome_flops)

TINY = dict(img_size=8, patch_size=2, embed_dim=8, depth=2, num_heads=2, num_classes=3)


def _tiny(**kw):
    return create_model(**{**TINY, **kw})


# ---- ToMe ----------------------------------------------------------------------------------------------------
def test_matching_edge_cases():
    x = torch.randn(2, 17, 4)
    merge, r = bipartite_soft_matching(x, 3)  # by default the first (class) token is protected
    merge1, r1 = bipartite_soft_matching(x, 3, num_protected=1)
    assert r == r1 == 3 and torch.equal(merge(x), merge1(x))
    assert torch.equal(merge(x), merge(x, mode="mean"))  # merging averages unless told to sum
    for protected, t in ((1, 17), (1, 2), (3, 4)):
        xt = x[:, :t]
        merge, r = bipartite_soft_matching(xt, 0 if t == 17 else 5, num_protected=protected)
        assert r == 0 and merge(xt) is xt  # nothing to merge: the tokens pass as they are
    for protected in (6, 7):  # protected tokens keep their places, however many
        merge, r = bipartite_soft_matching(x, 3, num_protected=protected)
        merged, size = merge_wavg(merge, x, None)
        assert r == 3 and merged.shape == (2, 14, 4)
        assert torch.equal(merged[:, :protected], x[:, :protected]) and torch.all(size[:, :protected] == 1)


def test_parse_r():
    assert parse_r(3, 2) == [2, 2, 2] and parse_r(3, [0, 1, 0]) == [0, 1, 0] and parse_r(2, (4.0, 0)) == [4, 0]
    with pytest.raises(ValueError, match="tome r must be >= 0, got -1"):
        parse_r(3, -1)
    with pytest.raises(ValueError, match=r"a per-block tome r needs 3 values >= 0, got \[1, -2, 0\]"):
        parse_r(3, [1, -2, 0])
    with pytest.raises(ValueError, match=r"a per-block tome r needs 3 values >= 0, got \[1, 2\]"):
        parse_r(3, [1, 2])


def test_schedules_sizes_and_pooling():
    torch.manual_seed(0)
    m = apply_tome(_tiny(depth=3, global_pool="avg", fc_norm=False, class_token=False).eval(), 1)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        tokens, size = m.forward_features_sizes(x)
        assert tokens.shape == (2, 16 - 3, 8) and torch.all(size.sum(1) == 16)  # one token less per block
        pooled = (tokens * size).sum(1) / size.sum(1)  # a merged token weighs as the patches it stands for
        torch.testing.assert_close(m(x), m.head(pooled))
        apply_tome(m, (2, 0, 3))
        assert m.tome_r == [2, 0, 3]
        tokens, size = m.forward_features_sizes(x)
        assert tokens.shape == (2, 16 - 5, 8) and size is not None and torch.all(size.sum(1) == 16)
        apply_tome(m, [0, 0, 0])
        assert m.forward_features_sizes(x)[1] is None  # nothing merged: no sizes to carry
    with pytest.raises(ValueError, match="intermediate feature maps are not defined with token merging"):
        m.forward_intermediates(x)
    with pytest.raises(TypeError, match="apply_tome needs a vitkit VisionTransformer, got Linear"):
        apply_tome(nn.Linear(2, 2), 1)


def test_tome_attention_dropout_only_while_training():
    m = apply_tome(_tiny(attn_drop_rate=0.5), 2)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        m.eval()
        assert torch.equal(m(x), m(x))
        m.train()
        assert not torch.allclose(m(x), m(x))


def test_tome_flops_by_hand():
    m = apply_tome(_tiny(reg_tokens=1), [3, 100])
    d, f = 8, 32

    def block(n):
        return n * d * 3 * d + 2 * n * n * d + n * d * d

    # 16 patches + 2 prefix: block 1 merges 3, block 2 as many as allowed: (15 - 2) // 2 = 6
    macs = 16 * 3 * 4 * d + block(18) + 2 * 15 * d * f + block(15) + 2 * 9 * d * f + d * 3
    assert tome_flops(m) == 2.0 * macs
    # another input size, non-square: 4x6 patches
    macs = 24 * 3 * 4 * d + block(26) + 2 * 23 * d * f + block(23) + 2 * 13 * d * f + d * 3
    assert tome_flops(m, img_size=(8, 12)) == 2.0 * macs
    assert isinstance(m, ToMeVisionTransformer)
    big = apply_tome(_tiny(img_size=16, patch_size=4, in_chans=1, num_classes=0), 0)  # patch 4: p*p is not 2p
    assert tome_flops(big) == 2.0 * (16 * 1 * 16 * d + 2 * (block(17) + 2 * 17 * d * f))


# ---- DeiT ----------------------------------------------------------------------------------------------------
def test_deit_heads_average():
    m = VisionTransformerDistilled(**TINY, reg_tokens=1).double().eval()
    assert m.config.reg_tokens == 1 and isinstance(m.head_dist, nn.Linear) and m.head_dist.out_features == 3
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    tok = torch.randn(2, 18, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m.forward_head(tok, pre_logits=True), (tok[:, 0] + tok[:, 1]) / 2)
        torch.testing.assert_close(m.forward_head(tok), (m.head(tok[:, 0]) + m.head_dist(tok[:, 1])) / 2)
    assert isinstance(VisionTransformerDistilled(**{**TINY, "num_classes": 0}, reg_tokens=1).head_dist, nn.Identity)
    assert VisionTransformerDistilled(**{**TINY, "num_classes": 1}, reg_tokens=1).head_dist.out_features == 1
    for kw in (dict(reg_tokens=2), dict(reg_tokens=1, global_pool="avg"), dict(reg_tokens=0)):
        with pytest.raises(ValueError, match="a distilled ViT has exactly one distillation token"):
            VisionTransformerDistilled(**TINY, **kw)


def test_deit_reset_classifier():
    m = VisionTransformerDistilled(**TINY, reg_tokens=1).double()
    torch.manual_seed(0)
    m.reset_classifier(400, global_pool="token")
    for head in (m.head, m.head_dist):
        assert head.out_features == 400 and head.weight.dtype == torch.float64
        assert torch.equal(head.bias, torch.zeros(400, dtype=torch.float64))
        assert 0.017 < head.weight.std().item() < 0.023 and head.weight.abs().max().item() < 0.1
    m.reset_classifier(1)
    assert isinstance(m.head_dist, nn.Linear) and m.head_dist.out_features == 1
    assert torch.equal(m.head_dist.bias, torch.zeros(1, dtype=torch.float64))  # initialised as any other width
    m.reset_classifier(0)
    assert isinstance(m.head, nn.Identity) and isinstance(m.head_dist, nn.Identity)
    with pytest.raises(ValueError, match="global_pool must be 'token'"):
        m.reset_classifier(2, global_pool="avg")
    assert math.isclose(m.forward_head(torch.ones(1, 18, 8, dtype=torch.float64)).sum().item(), 8.0)
