"""What `vitkit models` and `vitkit summary` show, called from Python: model_table and summarize."""
import pytest

import vitkit
from vitkit.errors import ConfigError
from vitkit.models import count_params, get_config, list_models, model_table, summarize


def test_model_table_has_one_row_per_matching_config_with_its_size():
    rows = model_table("patch16_224")
    assert [r["name"] for r in rows] == list_models("patch16_224") and rows
    cfg = get_config(rows[0]["name"])
    assert (rows[0]["img_size"], rows[0]["patch"], rows[0]["dim"], rows[0]["depth"], rows[0]["heads"]) == (
        cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads)
    assert rows[0]["params_M"] == round(count_params(cfg) / 1e6, 2) and rows[0]["GFLOPs"] > 0
    assert [r["name"] for r in model_table()] == list_models()
    with pytest.raises(ConfigError, match="no model matches 'nope'"):
        model_table("nope")


def test_summarize_builds_the_model_with_its_overrides_and_runs_it():
    model, info = summarize("vit_mini_patch7_28", img_size=56, num_classes=3)
    assert isinstance(model, vitkit.VisionTransformer) and not model.training
    assert info["model"] == "vit_mini_patch7_28"
    assert info["input"] == [1, 1, 56, 56] and info["output"] == [1, 3]
    assert info["params"] == sum(p.numel() for p in model.parameters()) == count_params(model.config)
    assert info["tokens"] == 64 + 1 and info["GFLOPs"] > 0
    _, plain = summarize("vit_mini_patch7_28")
    assert plain["input"] == [1, 1, 28, 28] and plain["output"][1] == get_config("vit_mini_patch7_28").num_classes
