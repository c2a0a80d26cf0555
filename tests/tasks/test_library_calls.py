"""What `vitkit eval`, `vitkit export` and `vitkit eval-retrieval --out` compute, called from Python:
evaluate_checkpoint's default dataset, export_checkpoint, evaluate_retrieval(out=)."""
import json

import pytest

import vitkit
from vitkit.errors import ConfigError, RunExistsError

DIGITS = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two tiny 28x28 grey ViTs for sklearn's digits: one records its dataset, one does not."""
    root = tmp_path_factory.mktemp("calls")
    model = vitkit.create_model("vit_mini_patch7_28", embed_dim=16, depth=1, num_heads=2, num_classes=10)
    vitkit.save(model, root / "m.safetensors", class_names=DIGITS, pretrained_cfg={"dataset": "digits"})
    vitkit.save(model, root / "bare.safetensors", class_names=DIGITS)
    return root


def test_evaluate_checkpoint_defaults_to_the_dataset_the_checkpoint_records(ckpts, tmp_path):
    from vitkit.tasks.classify import evaluate_checkpoint

    res = evaluate_checkpoint(ckpts / "m.safetensors", out_dir=tmp_path, max_val=50)
    assert res["data"] == "digits" and res["num_images"] == 50 and (tmp_path / "eval.json").is_file()
    with pytest.raises(ConfigError, match="does not record its dataset; pass --data"):
        evaluate_checkpoint(ckpts / "bare.safetensors", out_dir=tmp_path)


def test_export_checkpoint_writes_the_format_and_refuses_an_existing_output_before_loading(ckpts, tmp_path):
    from vitkit.io.export import export_checkpoint

    info = export_checkpoint(ckpts / "m.safetensors", "vitkit", tmp_path / "e.safetensors", num_classes=4)
    assert info["path"] == str(tmp_path / "e.safetensors") and info["format"] == "vitkit"
    assert info["config"] == {"img_size": 28, "patch_size": 7, "in_chans": 1, "embed_dim": 16, "depth": 1,
                              "num_heads": 2, "num_classes": 4}
    assert vitkit.load(tmp_path / "e.safetensors").config.num_classes == 4
    with pytest.raises(RunExistsError, match="exists already"):  # the checkpoint is never read: it does not exist
        export_checkpoint(tmp_path / "missing.safetensors", "vitkit", tmp_path / "e.safetensors")
    assert export_checkpoint(ckpts / "m.safetensors", "vitkit", tmp_path / "e.safetensors", overwrite=True)
    src = tmp_path / "src.safetensors"
    src.write_bytes((ckpts / "m.safetensors").read_bytes())
    assert export_checkpoint(src, "npz")["path"] == str(tmp_path / "src.npz")  # default: beside the checkpoint


def test_evaluate_retrieval_writes_its_result_to_out(ckpts, tmp_path):
    from vitkit.tasks.retrieve import evaluate_retrieval

    out = tmp_path / "sub" / "retrieval.json"
    res = evaluate_retrieval(ckpts / "m.safetensors", "digits", max_train=100, max_val=30, knn_k=5, progress=False,
                             out=out)
    assert json.loads(out.read_text()) == res and out.read_text().endswith("}\n")
    assert (res["queries"], res["database"]) == (30, 100)
    assert sorted(p.name for p in out.parent.iterdir()) == ["retrieval.json"]  # no temp file left
    assert evaluate_retrieval(ckpts / "m.safetensors", "digits", max_train=100, max_val=30, knn_k=5,
                              progress=False) == res
