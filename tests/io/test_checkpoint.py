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
