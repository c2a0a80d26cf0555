"""vitkit's own checkpoint format: round trip, metadata, and refusal of bad files."""
import pytest
import torch

import vitkit
from vitkit.errors import CheckpointError
from vitkit.models import create_model


def test_save_load_round_trip(tmp_path):
    model = create_model("vit_mini_patch7_28", reg_tokens=1).eval()
    path = vitkit.save(model, tmp_path / "m.safetensors", class_names=list("abcdefghij"))
    again = vitkit.load(path)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert again.config == model.config
    assert again.pretrained_cfg["class_names"] == list("abcdefghij")
    assert again.pretrained_cfg["input_size"] == [1, 28, 28]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_load_refuses_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        vitkit.load(tmp_path / "nope.safetensors")
    model = create_model("vit_mini_patch7_28")
    path = vitkit.save(model, tmp_path / "m.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        vitkit.load(tmp_path / "cut.safetensors")
    other = create_model("vit_mini_patch4_28")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        vitkit.io.load_state_dict_checked(other, model.state_dict())


def test_load_pretrained_adapts_size_and_head(tmp_path):
    model = create_model("vit_mini_patch7_28")
    path = vitkit.save(model, tmp_path / "m.safetensors", class_names=[str(i) for i in range(10)])
    net = vitkit.io.load_pretrained(path, img_size=56, num_classes=3)
    assert net(torch.randn(1, 1, 56, 56)).shape == (1, 3)
    assert net.pos_embed.shape[1] == 1 + 64 and net.pretrained_cfg["class_names"] is None
    with pytest.raises(CheckpointError, match="does not exist"):
        vitkit.io.load_pretrained(tmp_path / "missing.pth")


def test_changed_pooling_survives_save_and_load(tmp_path):
    """reset_classifier(global_pool='avg') on a class-token model keeps its trained final norm; the saved config
    must say so, or the checkpoint would not load back (norm vs fc_norm)."""
    model = create_model("vit_mini_patch7_28").eval()
    model.reset_classifier(4, global_pool="avg")
    again = vitkit.load(vitkit.save(model, tmp_path / "m.safetensors"))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def _resave(path, out, meta_edit=None, tensor_edit=None):
    """A copy of a vitkit checkpoint with its metadata and/or tensors edited (a forged or damaged file)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta_edit:
        cfg = json.loads(meta["config"])
        cfg.update(meta_edit)
        meta["config"] = json.dumps(cfg)
    if tensor_edit:
        tensor_edit(tensors)
    save_file(tensors, str(out), metadata=meta)
    return out


def test_nan_weights_are_an_error_naming_the_file_and_tensor(tmp_path, capsys):
    from vitkit.cli import main

    path = vitkit.save(create_model("vit_mini_patch7_28"), tmp_path / "m.safetensors")
    bad = _resave(path, tmp_path / "nan.safetensors",
                  tensor_edit=lambda t: t["blocks.1.mlp.fc2.weight"].view(-1)[3:5].fill_(float("nan")))
    with pytest.raises(CheckpointError, match=r"nan\.safetensors.*NaN or infinite weights in blocks\.1\.mlp\.fc2"):
        vitkit.load(bad)
    torch.manual_seed(0)
    from PIL import Image

    Image.fromarray((torch.rand(28, 28) * 255).byte().numpy()).save(tmp_path / "x.png")
    assert main(["predict", str(bad), str(tmp_path / "x.png")]) != 0
    err = capsys.readouterr().err
    assert "nan.safetensors" in err and len(err.strip().splitlines()) == 1


def test_non_finite_outputs_are_an_error_naming_the_checkpoint(tmp_path):
    """Finite weights that overflow give inf logits or NaN embeddings: predict and embed refuse instead of
    printing nan or storing it."""
    from PIL import Image

    from vitkit.tasks.classify import predict

    model = create_model("vit_mini_patch7_28")
    with torch.no_grad():
        model.head.weight.fill_(1e30)
        model.fc_norm.weight.fill_(1e30) if hasattr(model.fc_norm, "weight") else model.norm.weight.fill_(1e30)
    path = vitkit.save(model, tmp_path / "hot.safetensors")
    Image.fromarray((torch.rand(28, 28) * 255).byte().numpy()).save(tmp_path / "x.png")
    with pytest.raises(CheckpointError, match=r"hot\.safetensors gives NaN or infinite outputs for .*x\.png"):
        predict(path, [tmp_path / "x.png"])
    from vitkit.tasks.retrieve import embed_folder

    with torch.no_grad():
        model.norm.weight.fill_(3e38)  # features overflow to inf: the normalised embeddings would be NaN
    path = vitkit.save(model, tmp_path / "hot2.safetensors")
    (tmp_path / "imgs").mkdir()
    Image.fromarray((torch.rand(28, 28) * 255).byte().numpy()).save(tmp_path / "imgs" / "y.png")
    with pytest.raises(CheckpointError, match=r"hot2\.safetensors gives NaN or infinite outputs for .*y\.png"):
        embed_folder(path, tmp_path / "imgs", tmp_path / "e.safetensors", progress=False)
    assert not (tmp_path / "e.safetensors").exists()


def test_forged_config_is_refused_before_anything_is_allocated(tmp_path, monkeypatch):
    """A checkpoint whose metadata claims embed_dim=2**20 (its tensors are 64 wide) fails with a clear message from
    the file header alone: the model is only ever built on the meta device (no memory) before the error."""
    from vitkit.io import checkpoint
    from vitkit.models import VisionTransformer

    path = vitkit.save(create_model("vit_mini_patch7_28"), tmp_path / "m.safetensors")
    forged = _resave(path, tmp_path / "forged.safetensors", meta_edit={"embed_dim": 2 ** 20, "num_heads": 16})
    built_on = []

    class Recording(VisionTransformer):
        def __init__(self, config):
            if config.embed_dim == 2 ** 20:
                built_on.append(str(torch.get_default_device()))
                if built_on[-1] != "meta":
                    raise AssertionError("a model of the forged config was built on a real device")
            super().__init__(config)

    cfg_cls, _ = checkpoint.MODEL_TYPES["vit"]
    monkeypatch.setitem(checkpoint.MODEL_TYPES, "vit", (cfg_cls, Recording))
    with pytest.raises(CheckpointError, match=r"forged\.safetensors.*config does not match its own tensors.*"
                                              r"patch_embed\.proj\.weight"):
        vitkit.load(forged)
    assert built_on == ["meta"]
    assert isinstance(vitkit.load(path), Recording)  # an honest file still loads, through the same check
