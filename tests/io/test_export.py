"""Export: ONNX through onnxruntime, TorchScript and ExportedProgram round trips with a dynamic batch, the
weights written back as HF / timm / npz / vitkit and read by the reference libraries, and the CLI.

The exported models are re-randomised at a trained-like scale (`_reference.randomize_`) and checked not to be
degenerate, so a transposed or swapped tensor in a writer changes the reader's outputs by O(1)."""
import json

import numpy as np
import pytest
import torch
from _reference import assert_hidden_states_match, check_reference, randomize_

import vitkit
from vitkit.cli import main
from vitkit.errors import CheckpointError
from vitkit.io.export import export

SMALL = dict(embed_dim=64, depth=2, num_heads=4, img_size=32, patch_size=8, num_classes=5)


def _model(**kw):
    return randomize_(vitkit.create_model(**{**SMALL, **kw}).eval())


def _logits(m, x):
    with torch.no_grad():
        return m(x)


def test_onnx_round_trip_dynamic_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model = _model()
    model.pretrained_cfg = {"mean": [0.5] * 3, "class_names": list("abcde")}
    check_reference(model, torch.randn(2, 3, 32, 32))
    info = export(model, tmp_path / "m.onnx", "onnx")
    assert info["max_abs_diff"] <= 1e-4
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        assert got.shape == (batch, 5) and np.abs(got - _logits(model, x).numpy()).max() <= 1e-4
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["class_names"]) == list("abcde") and json.loads(meta["vitkit_config"])["depth"] == 2


@pytest.mark.parametrize("fmt", ["exported-program", "torchscript"])
def test_torch_graph_round_trips(tmp_path, fmt):
    model = _model(reg_tokens=1)
    check_reference(model, torch.randn(2, 3, 32, 32))
    path = tmp_path / "m.bin"
    assert export(model, path, fmt)["max_abs_diff"] <= 1e-5
    loaded = torch.export.load(str(path)).module() if fmt == "exported-program" else torch.jit.load(str(path))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max().item() <= 1e-5


def test_hf_export_loads_in_transformers_and_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _model()
    model.pretrained_cfg = {"mean": [0.4] * 3, "std": [0.2] * 3, "interpolation": "bicubic",
                            "class_names": list("vwxyz")}
    export(model, tmp_path / "hf", "hf")
    ref = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "hf")).eval()
    x = torch.randn(2, 3, 32, 32)
    check_reference(model, x)
    with torch.no_grad():
        out = ref(pixel_values=x, output_hidden_states=True)
        assert (out.logits - model(x)).abs().max().item() <= 1e-5
    assert_hidden_states_match(out.hidden_states, model, x)
    assert ref.config.id2label[4] == "z"
    back = vitkit.load_pretrained(tmp_path / "hf")
    assert torch.equal(_logits(back, x), _logits(model, x))
    assert back.pretrained_cfg["mean"] == [0.4] * 3 and back.pretrained_cfg["interpolation"] == "bicubic"
    with pytest.raises(CheckpointError, match="hf layout cannot hold.*register tokens"):
        export(_model(reg_tokens=2), tmp_path / "hf2", "hf")
    assert not (tmp_path / "hf2").exists()


def test_timm_export_folder_and_file(tmp_path):
    timm = pytest.importorskip("timm")
    model = _model(init_values=0.1, global_pool="avg")
    export(model, tmp_path / "t", "timm")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    ref = timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "t" / "model.safetensors"),
                                                        num_classes=5)).eval()
    x = torch.randn(2, 3, 32, 32)
    check_reference(model, x)
    assert (_logits(ref, x) - _logits(model, x)).abs().max().item() <= 1e-5
    back = vitkit.load_pretrained(tmp_path / "t")  # num_heads from config.json's model_args
    assert torch.equal(_logits(back, x), _logits(model, x))
    export(model, tmp_path / "w.pth", "timm")
    assert set(torch.load(tmp_path / "w.pth", weights_only=True)) == set(ref.state_dict())


def test_vitkit_round_trip_keeps_preprocessing(tmp_path):
    model = _model()
    model.pretrained_cfg = {"mean": [0.1, 0.2, 0.3], "std": [1, 1, 1], "crop_pct": 0.8, "class_names": list("pqrst")}
    export(model, tmp_path / "m.safetensors", "vitkit")
    back = vitkit.load(tmp_path / "m.safetensors")
    x = torch.randn(2, 3, 32, 32)
    check_reference(model, x)
    assert torch.equal(_logits(back, x), _logits(model, x))
    assert back.pretrained_cfg["crop_pct"] == 0.8 and back.pretrained_cfg["class_names"] == list("pqrst")


def test_cli_export_any_source_and_refusals(tmp_path, capsys):
    timm = pytest.importorskip("timm")
    ref = randomize_(timm.models.VisionTransformer(**SMALL).eval())
    torch.save({"model": ref.state_dict()}, tmp_path / "ck.pth")
    assert main(["export", str(tmp_path / "ck.pth"), "--format", "onnx", "--json"]) == 2
    assert "--num-heads" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "ck.pth"), "--format", "npz", "--num-heads", "4", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == str(tmp_path / "ck.npz") and info["config"]["num_heads"] == 4
    x = torch.randn(2, 3, 32, 32)
    from_npz = vitkit.load_pretrained(tmp_path / "ck.npz")
    check_reference(from_npz, x)
    assert (_logits(from_npz, x) - _logits(ref, x)).abs().max().item() <= 1e-5
    before = (tmp_path / "ck.npz").read_bytes()
    assert main(["export", str(tmp_path / "ck.pth"), "--format", "npz", "--num-heads", "4"]) == 2
    assert "exists already" in capsys.readouterr().err and (tmp_path / "ck.npz").read_bytes() == before
    # the npz records the heads: it exports to ONNX with no extra flag, resampled to 48 px with a new 3-class head
    out = tmp_path / "ck48.onnx"
    assert main(["export", str(tmp_path / "ck.npz"), "--format", "onnx", "--img-size", "48", "--num-classes", "3",
                 "--out", str(out)]) == 0
    assert "max abs diff to PyTorch" in capsys.readouterr().out
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"pixel_values": np.zeros((2, 3, 48, 48), np.float32)})[0].shape == (2, 3)
    assert main(["export", str(tmp_path / "ck.npz"), "--format", "hf", "--from", "torchvision"]) == 2
    assert "not a complete torchvision ViT checkpoint" in capsys.readouterr().err
