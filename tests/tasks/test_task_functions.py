"""What the CLI's commands do, called from Python: explain_images, generate_to_folder, Index.add_new, search,
read_pretrained_cfg (eval's dataset without building the model) and saved_recipe (train --recipe)."""
import json

import numpy as np
import pytest
from PIL import Image

import vitkit
from vitkit.errors import CheckpointError, ConfigError

CLASSES = ["a", "b", "c"]


def _digit(i: int) -> np.ndarray:
    return (np.random.default_rng(i).random((28, 28)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 3-class 1-block ViT on 28x28 grey images (with a dataset in its metadata) and a 3x2-image gallery."""
    root = tmp_path_factory.mktemp("functions")
    model = vitkit.create_model("vit_mini_patch7_28", embed_dim=16, depth=1, num_heads=2, num_classes=3)
    vitkit.save(model, root / "m.safetensors", class_names=CLASSES, pretrained_cfg={"dataset": "digits"})
    for c, name in enumerate(CLASSES):
        (root / "g" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(_digit(10 * c + i)).save(root / "g" / name / f"{i}.png")
    Image.fromarray(_digit(99)).save(root / "q.png")
    return root


def test_explain_images_writes_a_figure_and_scores_per_image(world, tmp_path):
    from vitkit.tasks.explain import explain_images, figure_source

    images = [world / "g" / "a" / "0.png", world / "g" / "b" / "0.png"]
    rows = explain_images(world / "m.safetensors", images, tmp_path / "out", fmt="npy", size=(28, 35))
    assert [r["image"] for r in rows] == [str(p) for p in images]
    for r, img in zip(rows, images):
        assert r["png"].endswith(".png") and figure_source(r["png"]) == str(img.resolve())
        assert np.load(r["scores"]).shape == (4, 5) == tuple(r["grid"])  # 28x35 pixels at patch 7
        assert r["predicted"] in CLASSES
    with pytest.raises(FileExistsError):  # another image's outputs are not replaced
        explain_images(world / "m.safetensors", [world / "g" / "c" / "0.png"], tmp_path / "out" / "a", fmt="npy")


def test_explain_images_refuses_a_bad_size_before_loading(world, tmp_path):
    from vitkit.tasks.explain import explain_images

    with pytest.raises(ConfigError, match="size must be"):
        explain_images(tmp_path / "no_such_model", [world / "q.png"], tmp_path, size="224x320")


def test_generate_to_folder_names_and_writes_its_files(tmp_path):
    from vitkit.models.dit import DiT, DiTConfig
    from vitkit.tasks.generate import generate_to_folder

    dit = DiT(DiTConfig(embed_dim=32, depth=1, num_heads=2, num_classes=3))
    vitkit.save(dit, tmp_path / "dit.safetensors")
    res = generate_to_folder(tmp_path / "dit.safetensors", tmp_path / "s", classes=[2, 0], n=3, steps=2, seed=1)
    stem = tmp_path / "s" / "class2-0_n3_steps2_cfg2_seed1"
    assert res == {"checkpoint": str(tmp_path / "dit.safetensors"), "samples": 6, "png": f"{stem}.png",
                   "npy": f"{stem}.npy"}
    imgs = np.load(f"{stem}.npy")
    assert imgs.shape == (6, 1, 28, 28) and imgs.dtype == np.float32 and 0 <= imgs.min() <= imgs.max() <= 1
    assert np.load(f"{stem}_labels.npy").tolist() == [2, 2, 2, 0, 0, 0]
    again = generate_to_folder(tmp_path / "dit.safetensors", tmp_path / "t", classes=[2, 0], n=3, steps=2, seed=1)
    assert np.array_equal(np.load(again["npy"]), imgs)  # seeded


def test_explain_images_refuses_a_dit_in_one_line(tmp_path, world):
    from vitkit.models.dit import DiT, DiTConfig
    from vitkit.tasks.explain import explain_images

    vitkit.save(DiT(DiTConfig(embed_dim=32, depth=1, num_heads=2, num_classes=3)), tmp_path / "dit.safetensors")
    with pytest.raises(CheckpointError, match="not a ViT"):
        explain_images(tmp_path / "dit.safetensors", [world / "q.png"], tmp_path / "out")


def test_generate_to_folder_refuses_a_classifier_checkpoint(world, tmp_path):
    from vitkit.tasks.generate import generate_to_folder

    with pytest.raises(CheckpointError, match="not a DiT"):
        generate_to_folder(world / "m.safetensors", tmp_path)
    assert not any(tmp_path.iterdir())


def test_index_add_new_skips_the_paths_it_holds(world):
    from vitkit.tasks.retrieve import Embeddings, Index

    rng = np.random.default_rng(0)
    model = {"checkpoint": "m", "sha256": "x"}
    index = Index(4, model=model).add(rng.random((2, 4)), ["p0", "p1"], ["a", "b"], model=model)
    emb = Embeddings(rng.random((3, 4)), ["p1", "p2", "p3"], ["b", "c", "c"], [[0, 0]] * 3, model)
    assert index.add_new(emb) == 2
    assert index.paths == ["p0", "p1", "p2", "p3"] and len(index) == 4 and index.labels[-1] == "c"
    assert index.add_new(emb) == 0 and len(index) == 4
    with pytest.raises(ValueError):  # another model's embeddings, even when none of them is new
        index.add_new(Embeddings(emb.vectors, emb.paths, emb.labels, emb.keys, {"checkpoint": "n", "sha256": "y"}))


def test_search_embeds_the_queries_with_the_index_model(world, tmp_path):
    from vitkit.tasks.retrieve import Embeddings, build_index, embed_folder, search

    embed_folder(world / "m.safetensors", world / "g", tmp_path / "e.safetensors", progress=False)
    build_index(Embeddings.load(tmp_path / "e.safetensors")).save(tmp_path / "ix")
    gallery = sorted(str(p.resolve()) for p in (world / "g").rglob("*.png"))
    res = search(str(tmp_path / "ix"), [world / "g" / "b" / "1.png", world / "q.png"], k=2,
                 grid=tmp_path / "grid.png")
    assert res["k"] == 2 and res["grid"] == tmp_path / "grid.png" and (tmp_path / "grid.png").is_file()
    first, second = res["results"]
    assert first["query"] == str((world / "g" / "b" / "1.png").resolve())
    assert first["neighbours"][0]["path"] == first["query"] and first["neighbours"][0]["label"] == "b"
    assert len(second["neighbours"]) == 2 and all(n["path"] in gallery for n in second["neighbours"])
    manifest = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    manifest["model"].pop("checkpoint")
    (tmp_path / "ix" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="pass --checkpoint"):
        search(tmp_path / "ix", [world / "q.png"])


def test_read_pretrained_cfg_does_not_build_the_model(world, tmp_path, monkeypatch):
    from vitkit.io.checkpoint import read_pretrained_cfg
    from vitkit.models import VisionTransformer

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.safetensors").write_bytes((world / "m.safetensors").read_bytes())

    def no_build(*a, **k):
        raise AssertionError("the model was built")

    monkeypatch.setattr(VisionTransformer, "__init__", no_build)
    for path in (world / "m.safetensors", tmp_path / "run"):
        pcfg = read_pretrained_cfg(path)
        assert pcfg["dataset"] == "digits" and pcfg["class_names"] == CLASSES
    with pytest.raises(CheckpointError):
        read_pretrained_cfg(tmp_path)  # a folder without a checkpoint


@pytest.mark.parametrize("text", ["[1, 2]", '{"recipe": [1]}', "not json", '{"recipe": {"values": {}}}'])
def test_saved_recipe_refuses_what_is_no_run_config_in_one_line(tmp_path, text):
    from vitkit.tasks.recipe import saved_recipe

    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="--recipe"):
        saved_recipe(tmp_path)
    (tmp_path / "config.json").write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="--recipe"):
        saved_recipe(tmp_path / "config.json")


def test_saved_recipe_reads_the_set_fields(tmp_path):
    from vitkit.tasks.recipe import saved_recipe

    (tmp_path / "config.json").write_text(json.dumps({"recipe": {"values": {"lr": 0.01, "depth": None}}}))
    assert saved_recipe(tmp_path) == {"lr": 0.01}
    with pytest.raises(ConfigError, match="no such run folder"):  # one line, as every reader of a run says it
        saved_recipe(tmp_path / "nope")


def test_index_folders_are_built_once_and_added_to_without_duplicates(tmp_path):
    from vitkit.tasks.retrieve import Embeddings, Index, add_to_index, build_index_folder

    rng = np.random.default_rng(0)
    model = {"checkpoint": "m", "sha256": "x"}
    Embeddings(rng.random((2, 4)), ["p0", "p1"], ["a", "b"], [[0, 0]] * 2, model).save(tmp_path / "e1.safetensors")
    Embeddings(rng.random((3, 4)), ["p1", "p2", "p3"], ["b", "c", "c"], [[0, 0]] * 3, model).save(
        tmp_path / "e2.safetensors")
    index = build_index_folder(tmp_path / "e1.safetensors", tmp_path / "ix", "hnsw", M=8)
    assert index.kind == "hnsw" and len(index) == 2 and index.params["M"] == 8
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_index_folder(tmp_path / "e2.safetensors", tmp_path / "ix")
    with pytest.raises(ConfigError, match="M must be"):  # checked before anything is read
        build_index_folder(tmp_path / "nope.safetensors", tmp_path / "iy", M=1)
    assert add_to_index(tmp_path / "ix", tmp_path / "e2.safetensors") == {
        "added": 2, "skipped_already_indexed": 1, "count": 4}
    assert Index.load(tmp_path / "ix").paths == ["p0", "p1", "p2", "p3"]
    assert add_to_index(tmp_path / "ix", tmp_path / "e2.safetensors")["added"] == 0
    assert len(build_index_folder(tmp_path / "e2.safetensors", tmp_path / "ix", overwrite=True)) == 3
