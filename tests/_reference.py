"""Reference models that can show a conversion bug: every float tensor re-drawn at a trained-like scale, and a guard
that fails a test whose reference is degenerate (constant or ~0 outputs, near-uniform attention, default norms).

Default-initialised references hide swapped tensors: zero biases, unit LayerNorms and near-uniform attention make
q/k/v order, norm1/norm2 or bias swaps invisible. Used by every parity, import and export test.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

TOKENS = {"cls_token", "reg_token", "dist_token", "class_token", "distillation_token", "mask_token"}
POS_EMBEDS = {"pos_embed", "position_embeddings", "pos_embedding"}
QK_WEIGHTS = ("qkv", "query", "key", "q_proj", "k_proj", "in_proj_weight")


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw every float parameter and buffer of a timm / transformers / torchvision / vitkit ViT in place, seeded.

    Linear/conv weights (heads included) ~ N(0, gain / sqrt(fan_in)), gain 1 but 2.5 for q/k/v so that attention
    is peaked as in trained ViTs; biases ~ N(0, 0.3); LayerNorm weights ~ U(0.5, 1.5) (QK-norm's ~ U(2, 4)) and
    biases ~ N(0, 0.3); LayerScale gammas ~ U(0.2, 1); class/register/distillation tokens ~ N(0, 1); position
    embeddings ~ N(0, 0.5). Logits then stay O(1)-O(10). Any other float tensor is an error: nothing stays default."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())

    def normal(t, std):
        t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64) * std)

    def uniform(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64) * (hi - lo) + lo)

    tensors = list(model.named_parameters()) + list(model.named_buffers())
    with torch.no_grad():
        for name, t in tensors:
            if not t.is_floating_point():
                continue
            owner_name, _, leaf = name.rpartition(".")
            owner = modules.get(owner_name)
            if leaf in TOKENS:
                normal(t, 1.0)
            elif leaf in POS_EMBEDS:
                normal(t, 0.5)
            elif isinstance(owner, nn.LayerNorm):
                if leaf == "bias":
                    normal(t, 0.3)
                elif owner_name.endswith(("q_norm", "k_norm")):  # QK-norm undoes the q/k gain: it takes its place
                    uniform(t, 2.0, 4.0)
                else:
                    uniform(t, 0.5, 1.5)
            elif leaf == "gamma" or leaf.startswith("gamma_"):  # LayerScale: large enough that the blocks count
                uniform(t, 0.2, 1.0)
            elif leaf.endswith("weight") and t.ndim >= 2:
                fan_in = t[0].numel()
                gain = 2.5 if any(q in name for q in QK_WEIGHTS) else 1.0
                normal(t, gain / math.sqrt(fan_in))
            elif leaf.endswith("bias") and t.ndim == 1:
                normal(t, 0.3)
            else:
                raise TypeError(f"randomize_ does not know how to draw {name} {tuple(t.shape)}; add a rule for it")
    return model


def attention_entropy_ratio(model, x: torch.Tensor) -> float:
    """The highest, over blocks, of the mean attention entropy divided by log(N) (1.0 = uniform attention)."""
    with torch.no_grad():
        _, attns = model(x, return_attention=True)
    n = attns[0].shape[-1]
    ent = [-(a * a.clamp_min(1e-30).log()).sum(-1).mean().item() for a in attns]
    return max(ent) / math.log(n)


def check_reference(model, x: torch.Tensor, max_entropy: float = 0.8, max_abs: float = 50.0) -> torch.Tensor:
    """Fail unless a (vitkit) model is a reference that can show a conversion bug; return its outputs on `x`.

    Its parameters are not at their defaults (LayerNorms spread around 1 with non-zero biases, non-zero linear
    biases, LayerScale well above 1e-5); its outputs vary across the batch and across outputs, are not ~0 and stay
    O(1)-O(10), so a fixed 1e-5 tolerance means something; attention in every block is well below uniform."""
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            assert m.weight.std().item() > 0.1 and m.bias.abs().mean().item() > 0.05, \
                f"degenerate reference: LayerNorm {name} is (close to) its default"
        elif isinstance(m, nn.Linear) and m.bias is not None:
            assert m.bias.abs().mean().item() > 0.05, f"degenerate reference: {name}.bias is (close to) zero"
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            assert p.abs().mean().item() > 0.05, f"degenerate reference: LayerScale {name} is tiny"
    assert x.shape[0] >= 2, "check_reference needs a batch of at least 2 to see variation across it"
    with torch.no_grad():
        out = model(x)
    assert out.abs().mean().item() > 0.1, f"degenerate reference: outputs ~0 (mean |y| {out.abs().mean():.2e})"
    assert out.abs().max().item() < max_abs, f"outputs up to {out.abs().max():.1f}: scale the head down"
    assert out.std(0).mean().item() > 0.1, "degenerate reference: outputs do not vary across the batch"
    if out.shape[1] > 1:
        assert out.std(1).mean().item() > 0.1, "degenerate reference: outputs do not vary across classes/features"
    ratio = attention_entropy_ratio(model, x)
    assert ratio < max_entropy, f"degenerate reference: attention entropy {ratio:.2f} log(N), close to uniform"
    return out


def assert_hidden_states_match(ref_hidden, model, x: torch.Tensor) -> None:
    """transformers' `output_hidden_states` (embeddings, then each layer's output) == a vitkit model's, block by block.
    The residual stream grows to O(10) with trained-like weights: the tolerance is 1e-5 relative to each state's
    size (fp32 rounding of sums that large), while a swapped tensor moves a state by O(1)."""
    with torch.no_grad():
        emb = model.embed(x)
        _, inter = model.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True)
    if model.num_prefix_tokens:  # (patch tokens, prefix tokens) per block
        inter = [torch.cat([prefix, patches], dim=1) for patches, prefix in inter]
    ours = [emb] + list(inter)
    assert len(ref_hidden) == len(ours) == len(model.blocks) + 1
    for i, (a, b) in enumerate(zip(ref_hidden, ours)):
        assert a.shape == b.shape, f"hidden state {i}: {tuple(a.shape)} vs {tuple(b.shape)}"
        diff = (a - b).abs().max().item()
        assert diff <= 1e-5 * max(1.0, a.abs().max().item()), f"hidden state {i} (0 = embeddings) differs by {diff}"
