"""The one held-out loop (eval_batches / mean_over_batches): the numbers of the loops it replaced, bit for bit,
and the model's train/eval mode left as it was found."""
import pytest
import torch
import torch.nn.functional as F

from vitkit.data import BatchTransform, InMemoryDataset, make_loader
from vitkit.models import create_model
from vitkit.tasks.classify import evaluate
from vitkit.train import eval_batches, mean_over_batches


def _data(n=70):
    g = torch.Generator().manual_seed(0)
    ds = InMemoryDataset(torch.randint(0, 256, (n, 1, 14, 14), dtype=torch.uint8, generator=g), torch.arange(n) % 3)
    ds.transform = BatchTransform(14, [0.5], [0.5])
    return ds


def _model():
    torch.manual_seed(0)
    return create_model("", img_size=14, patch_size=7, in_chans=1, embed_dim=16, depth=1, num_heads=2,
                        num_classes=3)


@torch.no_grad()
def _old_loop(model, dataset, batch_size, seed):
    """The shape the three task loops had (denoising_loss, masked_loss, evaluate's loss), written out."""
    was = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for x, y in make_loader(dataset, batch_size, train=False):
        noisy = x + torch.randn(x.shape, generator=g)
        total += float(F.cross_entropy(model(noisy), y)) * len(y)
        n += len(y)
    model.train(was)
    return total / max(1, n)


@pytest.mark.parametrize("training", [True, False])
def test_mean_over_batches_is_the_old_loop_bit_for_bit(training):
    model, ds = _model(), _data()
    model.train(training)
    want = _old_loop(model, ds, 32, seed=1)
    assert model.training is training
    g = torch.Generator().manual_seed(1)
    got = mean_over_batches(model, ds, lambda x, y: F.cross_entropy(model(x + torch.randn(x.shape, generator=g)), y),
                            batch_size=32)
    assert got == want and model.training is training


def test_eval_batches_evaluates_in_eval_mode_and_restores_the_mode_when_stopped():
    model, ds = _model().train(), _data()
    seen = []
    for x, y in eval_batches(model, ds, 16):
        seen.append(model.training)
        break
    assert seen == [False] and model.training
    assert sum(len(y) for _, y in eval_batches(model, ds, 16)) == len(ds) and model.training


def test_evaluate_gives_the_same_numbers_as_before():
    """classify.evaluate on its shared loop: loss, top-1/top-5 and the confusion matrix as the inline loop had them."""
    model, ds = _model(), _data()
    conf = torch.zeros(3, 3, dtype=torch.long)
    loss, n = 0.0, 0
    with torch.no_grad():
        model.eval()
        for x, y in make_loader(ds, 32, train=False):
            logits = model(x).float()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            conf += torch.bincount(y * 3 + logits.argmax(-1), minlength=9).view(3, 3)
            n += len(y)
    model.train()
    ev = evaluate(model, ds, batch_size=32, full=True)
    assert ev["val_loss"] == loss / n and ev["confusion"] == conf.tolist() and ev["num_images"] == n
    assert ev["top1"] == 100.0 * conf.diag().sum().item() / n and ev["top5"] == 100.0 and model.training
