"""Retrieval: embeddings, the faiss index and its manifest, the metrics, and the CLI on real digit images."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit.cli import main
from vitkit.errors import CheckpointError, ConfigError, DataError
from vitkit.models.precision import TOLERANCES
from vitkit.data.inputs import load_batch
from vitkit.tasks.retrieve import (Embeddings, Index, build_index, embed_folder, embed_images, knn_classify,
                                   map_at_r, recall_at_k, retrieval_report)

from ._digits import mnist5k, write_digits


# ---- embeddings ----------------------------------------------------------------------------------------------
def test_embed_images_pools_layers_and_norm():
    model = vitkit.create_model("vit_mini_patch7_28", reg_tokens=2, depth=3).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        tokens = model.forward_features(x)
        expect = {"cls": tokens[:, 0], "mean": tokens[:, 3:].mean(1),  # 1 class + 2 register tokens skipped
                  "prelogits": model.forward_head(tokens, pre_logits=True)}
    for pool, ref in expect.items():
        e = embed_images(model, x, pool)
        assert e.shape == (4, 128)
        torch.testing.assert_close(e.norm(dim=1), torch.ones(4))
        torch.testing.assert_close(e, F.normalize(ref, dim=1))
    torch.testing.assert_close(embed_images(model, x, "cls", layer=-1), embed_images(model, x, "cls"))
    with torch.no_grad():
        t1 = model.norm(model.blocks[:2](model.embed(x)))
    torch.testing.assert_close(embed_images(model, x, "mean", layer=1), F.normalize(t1[:, 3:].mean(1), dim=1))
    avg = vitkit.create_model("vit_mini_patch7_28", class_token=False, global_pool="avg", depth=2).eval()
    with pytest.raises(ConfigError, match="no class token"):
        embed_images(avg, x, "cls")
    with pytest.raises(ConfigError, match="pre-logits"):
        embed_images(model, x, "prelogits", layer=1)
    with pytest.raises(ConfigError, match="out of range"):
        embed_images(model, x, "cls", layer=3)


# ---- metrics -------------------------------------------------------------------------------------------------
def _naive_metrics(q, ql, d, dl, ks, k_nn, T):
    sims = q @ d.T
    order = np.argsort(-sims, axis=1, kind="stable")
    rec = {k: np.mean([(dl[order[i, :k]] == ql[i]).any() for i in range(len(q))]) for k in ks}
    aps = []
    for i in range(len(q)):
        R = int((dl == ql[i]).sum())
        rel = dl[order[i, :R]] == ql[i]
        aps.append(sum(rel[:j + 1].sum() / (j + 1) for j in range(R) if rel[j]) / R)
    preds = []
    for i in range(len(q)):
        votes = np.zeros(dl.max() + 1)
        for j in order[i, :k_nn]:
            votes[dl[j]] += np.exp(sims[i, j] / T)
        preds.append(votes.argmax())
    return rec, float(np.mean(aps)), np.array(preds)


def test_metrics_match_a_direct_implementation():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 16))
    dl = rng.integers(0, 5, 300)
    ql = rng.integers(0, 5, 60)
    d = centres[dl] + 1.2 * rng.standard_normal((300, 16))
    q = centres[ql] + 1.2 * rng.standard_normal((60, 16))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    d, q = d.astype(np.float32), q.astype(np.float32)
    rec, mapr, preds = _naive_metrics(q, ql, d, dl, (1, 5, 10), 20, 0.07)
    got = recall_at_k(q, ql, d, dl, (1, 5, 10))
    for k in (1, 5, 10):
        assert got[f"recall@{k}"] == pytest.approx(rec[k])
    assert map_at_r(q, ql, d, dl) == pytest.approx(mapr, abs=1e-6)
    assert (knn_classify(q, d, dl, 20, 0.07).numpy() == preds).all()
    assert 0.2 < mapr < 0.95 and 0.3 < rec[1] < 1.0  # a case where the metrics are not trivially 0 or 1
    # a hand-worked mAP@R: class 0 has R=2 items; ranked [0, 1, 0] → AP@R = (1/1 + 0) / 2 = 0.5
    db = np.array([[1.0, 0.0], [0.9, 0.436], [0.6, 0.8]], np.float32)
    assert map_at_r(np.array([[1.0, 0.0]], np.float32), [0], db, [0, 1, 0]) == pytest.approx(0.5)
    # string labels work as well as integers
    assert retrieval_report(q, [str(v) for v in ql], d, [str(v) for v in dl])["recall@1"] == pytest.approx(rec[1])


# ---- the index -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_index_add_search_save_load(tmp_path, kind):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    paths = [f"/img/{i}.png" for i in range(3000)]
    model = {"sha256": "abc", "pool": "cls", "layer": None, "input_size": [1, 28, 28], "checkpoint": "m"}
    index = Index(32, kind, nprobe=8).add(x[:2000], paths[:2000], model=model)
    index.add(x[2000:], paths[2000:], model=model)
    assert len(index) == 3000
    q = x[::97] + 0.05 * rng.standard_normal((len(x[::97]), 32)).astype(np.float32)
    scores, ids = index.search(q, 5)
    assert (ids[:, 0] == np.arange(0, 3000, 97)).mean() >= 0.9  # approximate kinds may miss a few
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    index.save(tmp_path / "ix")
    again = Index.load(tmp_path / "ix")
    s2, i2 = again.search(q, 5)
    assert (i2 == ids).all() and np.allclose(s2, scores)
    assert again.neighbours(q[:1], 3)[0][0]["path"] == paths[ids[0, 0]]
    with pytest.raises(CheckpointError, match="do not compare"):
        again.add(x[:5], paths[:5], model={**model, "sha256": "other"})
    with pytest.raises(DataError, match="dimension"):
        again.search(np.zeros((1, 16), np.float32))


def test_index_load_refuses_damaged_folders(tmp_path):
    index = Index(8).add(np.eye(8, dtype=np.float32), [str(i) for i in range(8)])
    index.save(tmp_path / "ix")
    m = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    m["paths"] = m["paths"][:-1]
    (tmp_path / "ix" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="damaged"):
        Index.load(tmp_path / "ix")
    with pytest.raises(DataError, match="not a vitkit index"):
        Index.load(tmp_path)
    assert vitkit.Index is Index  # the public API


def test_index_options_and_manifests_are_checked(tmp_path):
    """k, nprobe, ef_search and the index shape are checked by name; a k beyond the entries gives them all; a
    manifest that disagrees with index.faiss (width, kind, values) is refused rather than searched."""
    index = Index(8).add(np.eye(8, dtype=np.float32), [str(i) for i in range(8)])
    for call, match in [(lambda: index.search(np.eye(8, dtype=np.float32)[:1], 0), "k must be >= 1, got 0"),
                        (lambda: index.search(np.eye(8, dtype=np.float32)[:1], 2.5), "k must be a whole number"),
                        (lambda: index.set_search_params(nprobe=0), "nprobe must be >= 1"),
                        (lambda: Index(8, "hnsw", M=1), "M must be >= 2"), (lambda: Index(0), "dim must be >= 1")]:
        with pytest.raises(vitkit.ConfigError, match=match):
            call()
    scores, ids = index.search(np.eye(8, dtype=np.float32)[:1], 10**12)  # no (1, 10^12) array
    assert ids.shape == (1, 8) and ids[0, 0] == 0
    index.save(tmp_path / "ix")
    good = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    for change, match in [({"dim": 4}, "4 says|8-dimensional"), ({"kind": "hnsw"}, "not the hnsw index"),
                          ({"params": {**good["params"], "nprobe": 0}}, "nprobe must be >= 1"),
                          ({"params": None}, "not a vitkit index manifest"), ({"paths": "x"}, "not a vitkit index")]:
        (tmp_path / "ix" / "manifest.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(DataError, match=match):
            Index.load(tmp_path / "ix")


# ---- the CLI on real images ----------------------------------------------------------------------------------
def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_embed_is_incremental_and_index_search_end_to_end(tmp_path, capsys, digits_model):
    _, (xte, yte) = mnist5k()  # held-out digits: the fixture's model never saw them
    gallery = tmp_path / "gallery"
    paths = write_digits(gallery, xte[:120], yte[:120])
    emb = tmp_path / "emb.safetensors"
    code, out, err = _run(capsys, ["embed", str(digits_model), str(gallery), "--out", str(emb), "--quiet"])
    assert code == 0, err
    assert json.loads(out)["embedded"] == 120
    first = Embeddings.load(emb)
    assert first.vectors.shape == (120, 64) and np.allclose(np.linalg.norm(first.vectors, axis=1), 1, atol=1e-5)
    assert dict(zip(first.paths, first.labels))[str(paths[0].resolve())] == str(int(yte[0]))

    # the folder grows by 10, one file changes, one goes: only 11 images are embedded again
    write_digits(gallery, xte[120:130], yte[120:130], prefix="new")
    from PIL import Image
    Image.fromarray((xte[200, 0].numpy() * 255).astype(np.uint8), "L").save(paths[5])
    paths[7].unlink()
    code, out, err = _run(capsys, ["embed", str(digits_model), str(gallery), "--out", str(emb), "--quiet"])
    info = json.loads(out)
    assert (info["images"], info["embedded"], info["reused"], info["removed"]) == (129, 11, 118, 1), info
    # ... and give the same vectors as embedding everything from scratch
    code, out, err = _run(capsys, ["embed", str(digits_model), str(gallery), "--out", str(tmp_path / "full.st"),
                                   "--quiet"])
    inc, full = Embeddings.load(emb), Embeddings.load(tmp_path / "full.st")
    assert inc.paths == full.paths
    np.testing.assert_allclose(inc.vectors, full.vectors, atol=1e-5)
    # --fast in fp32 (the exact fast path) gives the same embeddings under the same manifest
    code, out, err = _run(capsys, ["embed", str(digits_model), str(gallery), "--out", str(tmp_path / "fast.st"),
                                   "--quiet", "--fast", "--precision", "fp32"])
    assert code == 0, err
    fast = Embeddings.load(tmp_path / "fast.st")
    assert fast.paths == full.paths and fast.model == full.model and full.model["precision"] == "fp32"
    np.testing.assert_allclose(fast.vectors, full.vectors, atol=1e-4)
    # --fast alone (precision auto) records what it chose; its vectors stay within that precision's tolerance
    code, out, err = _run(capsys, ["embed", str(digits_model), str(gallery), "--out", str(tmp_path / "auto.st"),
                                   "--quiet", "--fast"])
    assert code == 0, err
    auto = Embeddings.load(tmp_path / "auto.st")
    chosen = auto.model["precision"]
    assert chosen in ("fp32", "bf16", "int8") and auto.paths == full.paths
    assert {k: v for k, v in auto.model.items() if not k.startswith("precision")} == \
        {k: v for k, v in full.model.items() if not k.startswith("precision")}
    assert np.min(np.sum(auto.vectors * full.vectors, axis=1)) >= TOLERANCES[chosen].cosine - 1e-3

    ix = tmp_path / "ix"
    code, out, err = _run(capsys, ["index", "build", str(tmp_path / "full.st"), "--out", str(ix)])
    assert code == 0, err
    assert json.loads(out)["count"] == 129
    query = str(paths[3])
    grid = tmp_path / "grid.png"
    code, out, err = _run(capsys, ["search", str(ix), query, str(paths[11]), "--k", "5", "--grid", str(grid)])
    assert code == 0, err
    res = json.loads(out)["results"]
    assert res[0]["neighbours"][0]["path"] == str(paths[3].resolve())
    assert res[0]["neighbours"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert len(res[1]["neighbours"]) == 5 and res[1]["neighbours"][0]["label"] == str(int(yte[11]))
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    assert Image.open(grid).size[0] > 400  # query + 5 neighbours across

    # index add appends only what is new
    write_digits(tmp_path / "more", xte[300:310], yte[300:310], prefix="more")
    _run(capsys, ["embed", str(digits_model), str(tmp_path / "more"), "--out", str(tmp_path / "more.st"), "--quiet"])
    code, out, err = _run(capsys, ["index", "add", str(ix), str(tmp_path / "more.st")])
    assert json.loads(out)["added"] == 10 and json.loads(out)["count"] == 139
    code, out, err = _run(capsys, ["index", "add", str(ix), str(tmp_path / "more.st")])
    assert json.loads(out)["added"] == 0
    code, out, err = _run(capsys, ["index", "build", str(tmp_path / "full.st"), "--out", str(ix)])
    assert code == 2 and "--overwrite" in err


def test_an_index_refuses_another_models_queries_and_embeddings(tmp_path, capsys, digits_model):
    _, (xte, yte) = mnist5k()
    write_digits(tmp_path / "g", xte[:20], yte[:20])
    other = vitkit.save(vitkit.create_model("vit_mini_patch7_28", embed_dim=64, depth=3, num_heads=4,
                                            mlp_ratio=2.0), tmp_path / "other.safetensors")
    main(["embed", str(digits_model), str(tmp_path / "g"), "--out", str(tmp_path / "a.st"), "--quiet"])
    main(["embed", str(other), str(tmp_path / "g"), "--out", str(tmp_path / "b.st"), "--quiet"])
    main(["index", "build", str(tmp_path / "a.st"), "--out", str(tmp_path / "ix")])
    capsys.readouterr()
    q = str(next((tmp_path / "g").rglob("*.png")))
    code, out, err = _run(capsys, ["search", str(tmp_path / "ix"), q, "--checkpoint", str(other), "--grid", ""])
    assert code == 2 and "do not compare" in err and len(err.strip().splitlines()) == 1
    code, out, err = _run(capsys, ["index", "add", str(tmp_path / "ix"), str(tmp_path / "b.st")])
    assert code == 2 and "do not compare" in err
    code, out, err = _run(capsys, ["embed", str(other), str(tmp_path / "g"), "--out", str(tmp_path / "a.st"),
                                   "--quiet"])
    assert code == 2 and "--overwrite" in err


def test_bad_input_gives_one_line_errors(tmp_path, capsys, digits_model):
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, ["embed", str(digits_model), str(tmp_path / "empty"), "--out", str(tmp_path / "e")])
    assert code == 2 and "holds no images" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.png").write_text("this is not an image")
    code, _, err = _run(capsys, ["embed", str(digits_model), str(bad), "--out", str(tmp_path / "e")])
    assert code == 2 and "notes.png" in err and "cannot read image" in err and "none of the 1" in err
    _, (xte, yte) = mnist5k()
    write_digits(bad, xte[:3], yte[:3])  # beside readable images, an unreadable one is skipped (or, strict, stops)
    code, out, err = _run(capsys, ["embed", str(digits_model), str(bad), "--out", str(tmp_path / "e"), "--quiet"])
    info = json.loads(out)
    assert code == 0 and info["images"] == 3 and info["skipped"] == [str((bad / "notes.png").resolve())]
    assert len(Embeddings.load(tmp_path / "e")) == 3
    code, _, err = _run(capsys, ["embed", str(digits_model), str(bad), "--out", str(tmp_path / "e2"), "--strict",
                                 "--quiet"])
    assert code == 2 and "notes.png" in err and len(err.strip().splitlines()) == 1
    write_digits(tmp_path / "g", xte[:5], yte[:5])
    main(["embed", str(digits_model), str(tmp_path / "g"), "--out", str(tmp_path / "a.st"), "--quiet"])
    main(["index", "build", str(tmp_path / "a.st"), "--out", str(tmp_path / "ix")])
    capsys.readouterr()
    png = next((tmp_path / "g").rglob("*.png")).read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])  # a truncated image file
    code, _, err = _run(capsys, ["search", str(tmp_path / "ix"), str(tmp_path / "cut.png"), "--grid", ""])
    assert code == 2 and "cut.png" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, ["search", str(tmp_path / "g"), str(tmp_path / "cut.png")])
    assert code == 2 and "not a vitkit index" in err
    for flags, said in [(["--k", "0"], "--k must be >= 1, got 0"), (["--nprobe", "-1"], "--nprobe must be >= 1"),
                        (["--ef-search", "0"], "--ef-search must be >= 1"),
                        (["--k", "x"], "argument --k: invalid int value")]:
        code, _, err = _run(capsys, ["search", str(tmp_path / "ix"), str(tmp_path / "cut.png"), *flags])
        assert code == 2 and said in err and len(err.strip().splitlines()) == 1, err
    code, _, err = _run(capsys, ["embed", str(digits_model), str(tmp_path / "g"), "--out", str(tmp_path / "e3"),
                                 "--batch-size", "0"])
    assert code == 2 and "--batch-size must be >= 1, got 0" in err


# ---- what a trained model retrieves --------------------------------------------------------------------------
def _near_duplicate_hits(ckpt, gallery, queries, targets, tmp_path) -> np.ndarray:
    """Whether each query's first neighbour in an index of `gallery` (embedded by the CLI's path) is its target."""
    out = tmp_path / f"{ckpt.stem}.st"
    embed_folder(ckpt, gallery, out, progress=False)
    index = build_index(Embeddings.load(out))
    model = vitkit.load(ckpt)
    q = embed_images(model, load_batch(queries, model), "prelogits")  # embed_folder's default for this model
    return np.array([r[0]["path"] == t for r, t in zip(index.neighbours(q, 1), targets)])


def test_near_duplicates_find_their_original_at_rank_1(tmp_path, digits_model):
    """Copies of gallery images with a 1-pixel crop on each side (resized back by the loader), brightness or
    contrast cut to 60% / 50%, a colour tint (saved as RGB, read as grey), or JPEG compression retrieve their
    original first, in a gallery of 100 held-out digits, 10 of each class: the nearest other images are the same
    digit written alike. An untrained model of the same shape, on the same queries, finds the original of the
    darker and flatter copies only now and then (~15%), so the trained embedding's invariance is what passes."""
    from PIL import Image, ImageEnhance

    _, (xte, yte) = mnist5k()
    pick = np.concatenate([np.where(yte.numpy() == c)[0][:10] for c in range(10)])
    gallery = write_digits(tmp_path / "gallery", xte[pick], yte[pick])
    qdir = tmp_path / "queries"
    qdir.mkdir()
    queries, targets = [], []
    for i, path in enumerate(gallery):
        im = Image.open(path).convert("L")
        edits = {"crop.png": im.crop((1, 1, 27, 27)),
                 "bright.png": ImageEnhance.Brightness(im).enhance(0.6),
                 "contrast.png": ImageEnhance.Contrast(im).enhance(0.5),
                 "tint.png": Image.merge("RGB", [im.point(lambda v, f=f: int(v * f)) for f in (1.0, 0.9, 0.8)]),
                 "jpeg.jpg": im}
        for name, e in edits.items():
            p = qdir / f"{i}_{name}"
            e.save(p, quality=75) if name.endswith(".jpg") else e.save(p)
            queries.append(p)
            targets.append(str(path.resolve()))
    untrained = vitkit.save(vitkit.create_model("vit_mini_patch7_28", embed_dim=64, depth=3, num_heads=4,
                                                mlp_ratio=2.0), tmp_path / "untrained.safetensors")
    hits = _near_duplicate_hits(digits_model, tmp_path / "gallery", queries, targets, tmp_path)
    base = _near_duplicate_hits(untrained, tmp_path / "gallery", queries, targets, tmp_path)
    assert hits.mean() >= 0.95, [p.name for p, h in zip(queries, hits) if not h]
    hard = np.array([p.name.endswith(("_bright.png", "_contrast.png")) for p in queries])
    assert hits[hard].mean() > base[hard].mean() + 0.4, (hits[hard].mean(), base[hard].mean())


def test_the_task_digits_are_vitkit_split():
    """The fixture model trains on `mnist5k()[0]` and the tests query with `mnist5k()[1]`: they must be vitkit's
    training and held-out splits (the ones `eval-retrieval --data mnist5k` uses), with no image in both."""
    from vitkit.data import build_datasets

    (xtr, ytr), (xte, yte) = mnist5k()
    train, val, _ = build_datasets("mnist5k", augment="none")

    def keys(x):
        return {bytes(v) for v in (x * 255).round().to(torch.uint8).flatten(1).numpy()}

    assert keys(xtr) == keys(train.images.float() / 255) and keys(xte) == keys(val.images.float() / 255)
    assert not keys(xtr) & keys(xte)
    assert sorted(ytr.tolist()) == sorted(train.labels.tolist()) and sorted(yte.tolist()) == sorted(val.labels.tolist())


def test_eval_retrieval_reports_recall_map_and_knn(tmp_path, capsys, digits_model):
    """On mnist5k (held-out digits as queries, training digits as the database) the trained model's embedding
    beats an untrained one of the same shape on every figure."""
    untrained = vitkit.save(vitkit.create_model("vit_mini_patch7_28", embed_dim=64, depth=3, num_heads=4,
                                                mlp_ratio=2.0), tmp_path / "untrained.safetensors")
    res = {}
    for name, ckpt in (("trained", digits_model), ("untrained", untrained)):
        code, out, err = _run(capsys, ["eval-retrieval", str(ckpt), "--data", "mnist5k", "--max-train", "2000",
                                       "--quiet", "--out", str(tmp_path / f"{name}.json")])
        assert code == 0, err
        res[name] = json.loads(out)
        assert json.loads((tmp_path / f"{name}.json").read_text()) == res[name]
    t, u = res["trained"], res["untrained"]
    assert (t["queries"], t["database"], t["pool"]) == (1000, 2000, "prelogits")
    assert t["recall@1"] <= t["recall@5"] <= t["recall@10"]
    for key in ("recall@1", "map@r", "knn20_acc"):
        assert t[key] > u[key] + 0.1, (key, t, u)
    assert t["knn20_acc"] > 0.8 and t["recall@1"] > 0.8


def test_retrieval_benchmark_quick_mode(capsys):
    """benchmarks/retrieval.py --quick: exact search is exact, IVF recall grows with nprobe, and the timing figures
    are well-formed (positive, finite, and the headline speed-up is the ratio of the rows it names). No timing is
    compared: on a shared machine which index is faster can flip."""
    import importlib.util
    import math
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_retrieval", Path(__file__).resolve().parents[2] /
                                                  "benchmarks" / "retrieval.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--quick", "--threads", "1"])
    rows = res["rows"]
    assert (res["n"], res["dim"]) == (20_000, 384) and [r["kind"] for r in rows] == ["flat", "ivf", "ivf"]
    assert rows[0]["kind"] == "flat" and rows[0]["recall@10"] == 1.0
    ivf = [r for r in rows if r["kind"] == "ivf"]
    assert [(r["param"], r["value"]) for r in ivf] == [("nprobe", 8), ("nprobe", 32)]
    assert 0 < ivf[0]["recall@10"] < ivf[1]["recall@10"] <= 1
    for r in rows:
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0, r
        assert math.isfinite(r["build_s"]) and r["build_s"] >= 0, r
    # the headline names the fastest IVF setting with recall@10 >= 0.9, else the most accurate one
    good = [r for r in ivf if r["recall@10"] >= 0.9]
    best = min(good, key=lambda r: r["median_ms"]) if good else max(ivf, key=lambda r: r["recall@10"])
    assert res["recall@10"] == best["recall@10"]
    assert res["speedup"] == pytest.approx(rows[0]["median_ms"] / best["median_ms"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"IVF (nlist 128, nprobe {best['value']}) vs exact on 20,000 x 384: "), last
    assert f"recall@10 {best['recall@10']:.3f}" in last


def test_embed_refuses_to_drop_another_folders_embeddings(tmp_path, capsys, digits_model):
    """`embed B --out file-of-A` used to replace A's vectors by B's without a word; now it is refused."""
    _, (xte, yte) = mnist5k()
    write_digits(tmp_path / "A", xte[:6], yte[:6])
    write_digits(tmp_path / "B", xte[6:10], yte[6:10])
    out = tmp_path / "emb.safetensors"
    code, _, err = _run(capsys, ["embed", str(digits_model), str(tmp_path / "A"), "--out", str(out), "--quiet"])
    assert code == 0, err
    code, _, err = _run(capsys, ["embed", str(digits_model), str(tmp_path / "B"), "--out", str(out), "--quiet"])
    assert code == 2 and "--overwrite" in err and str((tmp_path / "A").resolve()) in err
    assert len(err.strip().splitlines()) == 1 and len(Embeddings.load(out)) == 6
    code, _, err = _run(capsys, ["embed", str(digits_model), str(tmp_path / "B"), "--out", str(out), "--quiet",
                                 "--overwrite"])
    assert code == 0 and len(Embeddings.load(out)) == 4
    (tmp_path / "other.safetensors").write_bytes(b"not embeddings")
    code, _, err = _run(capsys, ["embed", str(digits_model), str(tmp_path / "A"), "--out",
                                 str(tmp_path / "other.safetensors"), "--quiet"])
    assert code == 2 and "--overwrite" in err and (tmp_path / "other.safetensors").read_bytes() == b"not embeddings"


def _emb_file(path, start, n, dim=8):
    model = {"checkpoint": None, "sha256": "same", "pool": "cls", "layer": None, "input_size": [1, 28, 28]}
    vecs = np.random.default_rng(start).standard_normal((n, dim)).astype(np.float32)
    Embeddings(vecs, [f"/img/{start + i}.png" for i in range(n)], [None] * n, [[0, 0]] * n, model).save(path)
    return path


@pytest.mark.parametrize("order", ["e1 first", "e2 first"])
def test_two_processes_adding_to_one_index_lose_nothing(tmp_path, order):
    """Two `vitkit index add` processes race on one index folder: the first is held inside its write (a test
    hook pauses it between writing and renaming the manifest) while the second starts. The second waits for the
    first's lock (naming its pid) and then adds to the updated index: every vector of both ends up in it."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    ix = tmp_path / "ix"
    build_index(Embeddings.load(_emb_file(tmp_path / "base.st", 0, 5))).save(ix)
    e1, e2 = _emb_file(tmp_path / "e1.st", 100, 3), _emb_file(tmp_path / "e2.st", 200, 4)
    first, second = (e1, e2) if order == "e1 first" else (e2, e1)
    env = dict(os.environ, PYTHONPATH=str(root / "src"))
    env.pop("VITKIT_TEST_PAUSE_WRITE", None)
    go = tmp_path / "go"  # the first is held inside its write until the second has said whom it waits for
    cmd = [sys.executable, "-m", "vitkit", "index", "add", str(ix)]
    a = subprocess.Popen(cmd + [str(first)], env=dict(env, VITKIT_TEST_PAUSE_WRITE="manifest.json:120",
                                                      VITKIT_TEST_PAUSE_UNTIL=str(go)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root)
    deadline = time.time() + 120
    while not list(ix.glob(".manifest.json.*.tmp")):  # the first is inside its write now
        assert a.poll() is None and time.time() < deadline, a.communicate()
        time.sleep(0.05)
    b = subprocess.Popen(cmd + [str(second)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=root)
    waited = ""
    while "another vitkit process" not in waited:
        line = b.stderr.readline()  # blocks until the second logs (it waits on the lock right after)
        assert line, f"the second process ended without waiting: {waited}"
        waited += line
    go.touch()
    out_a, err_a = a.communicate(timeout=180)
    out_b, err_b = b.communicate(timeout=180)
    err_b = waited + err_b
    assert a.returncode == 0 and b.returncode == 0, (err_a, err_b)
    assert f"pid {a.pid}" in err_b  # the second said whom it waited for
    index = Index.load(ix)
    assert sorted(index.paths) == sorted([f"/img/{i}.png" for i in range(5)] + [f"/img/{100 + i}.png" for i in
                                         range(3)] + [f"/img/{200 + i}.png" for i in range(4)])
    assert len(index) == 12


def test_search_grid_draws_downscaled_images(tmp_path, monkeypatch):
    """An 1800x1200 query and neighbour reach matplotlib as thumbnails, not at their own size."""
    import matplotlib.axes
    from PIL import Image

    from vitkit.tasks.retrieve import save_grid

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (1200, 1800, 3), dtype=np.uint8)).save(tmp_path / "q.png")
    Image.fromarray(rng.integers(0, 256, (1800, 900, 3), dtype=np.uint8)).save(tmp_path / "n.jpg")
    shapes = []
    real = matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow",
                        lambda self, X, *a, **k: shapes.append(np.asarray(X).shape) or real(self, X, *a, **k))
    res = [[{"rank": 1, "path": str(tmp_path / "n.jpg"), "score": 0.9, "label": None},
            {"rank": 2, "path": str(tmp_path / "gone.png"), "score": 0.5, "label": None}]]
    save_grid(tmp_path / "g.png", [str(tmp_path / "q.png")], res, channels=3)
    assert len(shapes) == 2 and max(max(s[:2]) for s in shapes) <= 320
    assert shapes[0][:2] == (213, 320) and shapes[1][:2] == (320, 160)  # aspect kept
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_embeddings_record_their_precision_and_search_warns_across_precisions(tmp_path, digits_model, caplog):
    """An index is never searched with queries of another precision without a warning; an embeddings file updated
    in another precision says it is mixed."""
    from vitkit.tasks.retrieve import build_index_folder, search

    _, (xte, yte) = mnist5k()
    gallery = tmp_path / "gallery"
    paths = write_digits(gallery, xte[:40], yte[:40])
    emb = tmp_path / "e.safetensors"
    embed_folder(digits_model, gallery, emb, progress=False, fast=True, precision="int8")
    first = Embeddings.load(emb)
    assert first.model["precision"] == "int8"
    build_index_folder(emb, tmp_path / "ix")
    with caplog.at_level("WARNING", logger="vitkit.tasks.retrieve"):
        search(str(tmp_path / "ix"), [str(paths[0])], k=3)
    assert any("holds int8 embeddings but the queries are fp32" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="vitkit.tasks.retrieve"):
        res = search(str(tmp_path / "ix"), [str(paths[0])], k=3, precision="int8")
    assert not [r for r in caplog.records if "queries are" in r.getMessage()]
    assert res["results"][0]["neighbours"][0]["path"] == str(paths[0].resolve())
    # two new digits embedded in fp32 into the int8 file: the file says it is mixed, and warns
    write_digits(gallery, xte[40:42], yte[40:42], prefix="new")
    with caplog.at_level("WARNING", logger="vitkit.tasks.retrieve"):
        embed_folder(digits_model, gallery, emb, progress=False)
    assert any("mixed" in r.getMessage() for r in caplog.records)
    mixed = Embeddings.load(emb)
    assert mixed.model["precision"] == "mixed" and mixed.model["precisions"] == ["fp32", "int8"]
    # re-embedding nothing keeps the file's precision; a fresh fp32 file is fp32
    embed_folder(digits_model, gallery, emb, progress=False)
    assert Embeddings.load(emb).model["precision"] == "mixed"
    embed_folder(digits_model, gallery, tmp_path / "f.safetensors", progress=False)
    assert Embeddings.load(tmp_path / "f.safetensors").model["precision"] == "fp32"
