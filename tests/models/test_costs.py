"""What the benchmarks claim, checked by counting instead of timing: the FLOPs a model executes (ToMe executes fewer,
as many as vitkit's analytic counts say) and the bytes autograd keeps for backward (activation checkpointing keeps
one (B, N, D) input per block). These counts are the same on every machine and under any load."""
import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from vitkit.models import count_flops, create_model
from vitkit.models.tome import apply_tome, tome_flops

# PyTorch's counter has no formula for the CPU's fused attention kernel (the GPU ones and the math path it knows)
CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}


def _executed_flops(model, x) -> float:
    """FLOPs per image of one forward, counted op by op as it runs."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        model(x)
    return counter.get_total_flops() / len(x)


@pytest.mark.parametrize("kw", [{}, {"global_pool": "avg", "class_token": False}, {"reg_tokens": 2}])
def test_executed_flops_are_the_analytic_count(kw):
    m = create_model("vit_mini_patch4_28", depth=3, **kw).eval()
    assert _executed_flops(m, torch.randn(2, 1, 28, 28)) == count_flops(m.config)["flops"]


def test_tome_executes_fewer_flops_as_many_as_tome_flops_says():
    plain = create_model("vit_mini_patch4_28", depth=4).eval()
    x = torch.randn(2, 1, 28, 28)
    full = _executed_flops(plain, x)
    got = []
    for r in (2, 4, 8):
        m = apply_tome(copy.deepcopy(plain), r)
        ran = _executed_flops(m, x)
        # the analytic count leaves out only the bipartite matching's similarities (well under 1%)
        assert tome_flops(m) <= ran <= 1.01 * tome_flops(m)
        got.append(ran)
    assert full > got[0] > got[1] > got[2] and got[2] < 0.7 * full


def _held_for_backward(model, x) -> int:
    """Bytes of the activations a forward keeps for backward: the tensors autograd saves, and the block inputs
    that activation checkpointing keeps to recompute from (storages counted once, parameters not counted)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held = {}

    def keep(t) -> None:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            held[s.data_ptr()] = s.nbytes()

    def pack(t):
        keep(t)
        return t

    hooks = [b.register_forward_pre_hook(lambda mod, args: keep(args[0])) for b in model.blocks]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)  # alive until counted, so no storage is freed and reused meanwhile
        return sum(held.values()) if out is not None else 0
    finally:
        for h in hooks:
            h.remove()


def test_activation_checkpointing_keeps_one_input_per_block():
    x = torch.randn(4, 1, 28, 28)
    held = {}
    for depth in (2, 4):
        m = create_model("vit_mini_patch4_28", depth=depth).train()
        plain = _held_for_backward(m, x)
        m.set_grad_checkpointing(True)
        held[depth] = (plain, _held_for_backward(m, x))
    per_input = 4 * 50 * 128 * 4  # one block's input: B x N x D float32 (49 patches + the class token)
    assert held[4][1] - held[2][1] == 2 * per_input  # checkpointed: two more blocks, two more inputs
    assert held[4][0] - held[2][0] > 8 * per_input  # plain backprop keeps far more per block
    assert 4 * held[4][1] < held[4][0]
