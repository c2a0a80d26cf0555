"""`vitkit eval` and `vitkit embed` under torchrun (2 gloo processes on the CPU): each process takes a part of the data
and the result is the one process's: the same metrics, the same embeddings file (order, paths, values to 1e-6); an
error in any process's part stops every process with the one-line error instead of leaving the others waiting."""
import json
import textwrap

import numpy as np
import pytest
import torch

import vitkit
from vitkit.cli import main
from vitkit.tasks.retrieve import Embeddings

from _runs import torchrun

from ._digits import mnist5k, write_digits

SCRIPT = textwrap.dedent("""
    import json, os, sys
    from vitkit.cli import main

    ckpt, folder, bad, out = sys.argv[1:5]
    rcs = [main(["eval", ckpt, "--data", "mnist5k", "--max-val", "37", "--batch-size", "8", "--out", out + "/ev2",
                 "--json"]),
           main(["embed", ckpt, folder, "--out", out + "/e2.safetensors", "--batch-size", "4", "--quiet"]),
           main(["embed", ckpt, bad, "--out", out + "/bad.safetensors", "--strict", "--quiet"])]
    with open(os.path.join(out, "rc%s.json" % os.environ["RANK"]), "w") as f:
        json.dump(rcs, f)
""")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eval_and_embed_under_torchrun_equal_one_process(tmp_path, capsys):
    torch.manual_seed(0)
    model = vitkit.create_model("vit_mini_patch7_28", embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    ckpt = tmp_path / "m.safetensors"
    vitkit.save(model, ckpt, class_names=[str(i) for i in range(10)])
    (x, y), _ = mnist5k()
    write_digits(tmp_path / "imgs", x[:13], y[:13])  # 13 files: the two processes get 7 and 6
    write_digits(tmp_path / "bad", x[:5], y[:5])
    (tmp_path / "bad" / "9").mkdir(exist_ok=True)
    (tmp_path / "bad" / "9" / "zz.png").write_bytes(b"not a png")  # last in order: the second process's part
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    proc = torchrun([script, ckpt, tmp_path / "imgs", tmp_path / "bad", tmp_path])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # every process: eval and embed succeeded, the strict embed failed with the one-line error
    assert [json.loads((tmp_path / f"rc{r}.json").read_text()) for r in (0, 1)] == [[0, 0, 2], [0, 0, 2]]
    assert proc.stderr.count("vitkit: error: cannot read image") == 2 and "zz.png" in proc.stderr
    assert not (tmp_path / "bad.safetensors").exists()
    assert proc.stdout.count('"top1"') == 1  # rank 0 alone prints

    assert main(["eval", str(ckpt), "--data", "mnist5k", "--max-val", "37", "--batch-size", "8", "--out",
                 str(tmp_path / "ev1"), "--json"]) == 0
    one, two = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("ev1", "ev2"))
    assert one["num_images"] == two["num_images"] == 37
    for k in ("top1", "top5", "per_class", "confusion"):
        assert one[k] == two[k], k
    assert abs(one["val_loss"] - two["val_loss"]) <= 1e-5
    assert 0 < one["top1"] < 100  # an untrained model: the confusion matrix is not one column

    assert main(["embed", str(ckpt), str(tmp_path / "imgs"), "--out", str(tmp_path / "e1.safetensors"),
                 "--batch-size", "4", "--quiet"]) == 0
    a, b = Embeddings.load(tmp_path / "e1.safetensors"), Embeddings.load(tmp_path / "e2.safetensors")
    assert len(a) == 13 and a.paths == b.paths and a.labels == b.labels and a.keys == b.keys and a.model == b.model
    assert np.abs(a.vectors - b.vectors).max() <= 1e-6
    assert np.abs(a.vectors[1:] - a.vectors[:-1]).max() > 1e-3  # distinct images: order matters to the check
