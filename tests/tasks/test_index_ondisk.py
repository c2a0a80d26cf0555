"""An IVF index built from several embeddings files (one per process or shard) and merged on disk returns the
neighbours of the same index built in memory; indexes open memory-mapped; the CLI builds and searches them."""
import json
import shutil

import numpy as np
import pytest
import torch

import vitkit
from vitkit.cli import main
from vitkit.errors import CheckpointError, ConfigError, DataError
from vitkit.tasks.retrieve import IVFDATA, Embeddings, Index, build_index, build_index_folder

from ._digits import mnist5k, write_digits

MODEL = {"checkpoint": None, "sha256": "weights:test", "pool": "cls", "layer": None, "input_size": [1, 28, 28]}


def _files(tmp_path, sizes=(300, 520, 250), dim=16, model=MODEL, start=0):
    """Embeddings files of clustered random unit vectors (so the IVF cells mean something), paths disjoint."""
    rng = np.random.default_rng(start)
    centres = rng.standard_normal((12, dim))
    out, at = [], start
    for i, n in enumerate(sizes):
        x = (centres[rng.integers(0, 12, n)] + 0.3 * rng.standard_normal((n, dim))).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        paths = [f"/data/img{j:06d}.png" for j in range(at, at + n)]
        at += n
        out.append(Embeddings(x, paths, [str(j % 7) for j in range(n)], [[0, 0]] * n, model).save(
            tmp_path / f"e{start}_{i}.safetensors"))
    return out


def _together(files):
    embs = [Embeddings.load(f) for f in files]
    return Embeddings(np.concatenate([e.vectors for e in embs]), [p for e in embs for p in e.paths],
                      [lab for e in embs for lab in e.labels], [k for e in embs for k in e.keys], embs[0].model)


def test_merged_ondisk_index_returns_the_in_memory_neighbours(tmp_path):
    files = _files(tmp_path)
    disk = build_index_folder(files, tmp_path / "ix", "ivf", nlist=8, nprobe=2)
    assert disk.storage == "ondisk" and len(disk) == 1070
    assert sorted(p.name for p in (tmp_path / "ix").iterdir() if not p.name.startswith(".")) == \
        ["index.faiss", IVFDATA, "manifest.json"]  # the shards and the build folder are gone
    assert not any((tmp_path / "ix").glob(".build-*"))
    memory = build_index(_together(files), "ivf", nlist=8, nprobe=2)
    # the same training sample: the same cells
    c_disk, c_mem = (ix.index.quantizer.reconstruct_n(0, 8) for ix in (disk, memory))
    np.testing.assert_array_equal(c_disk, c_mem)
    queries = _together(files).vectors[::37] + 0.05
    shutil.move(str(tmp_path / "ix"), str(tmp_path / "moved"))  # the folder travels with its lists
    disk = Index.load(tmp_path / "moved")
    assert disk.storage == "ondisk" and disk.paths == memory.paths and disk.labels == memory.labels
    assert not _in_memory(disk) and _in_memory(memory)
    for nprobe in (2, 8):  # a few cells; every cell (exact)
        disk.set_search_params(nprobe=nprobe)
        memory.set_search_params(nprobe=nprobe)
        (sd, idd), (sm, idm) = disk.search(queries, 10), memory.search(queries, 10)
        np.testing.assert_array_equal(idd, idm)
        np.testing.assert_allclose(sd, sm, atol=1e-6)
    exact = queries / np.linalg.norm(queries, axis=1, keepdims=True) @ _together(files).vectors.T
    np.testing.assert_allclose(sd[:, 0], exact.max(axis=1), atol=1e-5)  # nprobe = nlist is exhaustive
    assert disk.neighbours(queries[:1], 3) == memory.neighbours(queries[:1], 3)
    with pytest.raises(DataError, match="read-only"):
        disk.add(queries[:1])


def _in_memory(ix) -> bool:
    """Whether faiss holds the index's vectors in its own memory (not a mapped file)."""
    import faiss

    if ix.kind == "ivf":
        return type(faiss.downcast_InvertedLists(faiss.extract_index_ivf(ix.index).invlists)).__name__ != \
            "OnDiskInvertedLists"
    flat = faiss.downcast_index(ix.index.storage) if ix.kind == "hnsw" else ix.index
    return bool(flat.codes.is_owned)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_an_index_opens_memory_mapped_and_searches_the_same(tmp_path, kind):
    (f,) = _files(tmp_path, sizes=(400,))
    build_index_folder(f, tmp_path / "ix", kind, nlist=4)
    plain, mapped = Index.load(tmp_path / "ix"), Index.load(tmp_path / "ix", mmap=True)
    assert plain.storage == "memory" and mapped.storage == "mmap"
    q = Embeddings.load(f).vectors[:20]
    for a, b in zip(plain.search(q, 5), mapped.search(q, 5)):
        np.testing.assert_array_equal(a, b)
    assert not _in_memory(mapped) and _in_memory(plain)
    with pytest.raises(DataError, match="read-only"):  # faiss would abort the process writing to a mapped file
        mapped.add(q[:1])
    assert "storage" not in json.loads((tmp_path / "ix" / "manifest.json").read_text())  # the 0.1.0 manifest


def test_several_files_must_agree_and_not_repeat_an_image(tmp_path):
    a = _files(tmp_path, sizes=(100,))
    other = _files(tmp_path, sizes=(100,), model={**MODEL, "sha256": "weights:other"}, start=500)
    with pytest.raises(CheckpointError, match="embeddings of"):
        build_index_folder(a + other, tmp_path / "x1", "ivf", nlist=2)
    with pytest.raises(DataError, match="in two of the embeddings files"):
        build_index_folder(a + a, tmp_path / "x2", "flat")
    with pytest.raises(ConfigError, match="--kind ivf"):
        build_index_folder(a, tmp_path / "x3", "flat", ondisk=True)
    both = _files(tmp_path, sizes=(60, 70), start=900)
    flat = build_index_folder(both, tmp_path / "x4", "flat")  # not IVF: put together in memory
    assert flat.storage == "memory" and len(flat) == 130 and not (tmp_path / "x4" / IVFDATA).exists()


def test_cli_embeds_shards_builds_an_ondisk_index_and_searches_it_mapped(tmp_path, capfd):
    torch.manual_seed(0)
    ckpt = tmp_path / "m.safetensors"
    vitkit.save(vitkit.create_model("vit_mini_patch7_28", embed_dim=32, depth=1, num_heads=2).eval(), ckpt)
    (x, y), _ = mnist5k()
    write_digits(tmp_path / "a", x[:30], y[:30])
    write_digits(tmp_path / "b", x[30:50], y[30:50], prefix="b")
    for part in ("a", "b"):
        assert main(["embed", str(ckpt), str(tmp_path / part), "--out", str(tmp_path / f"{part}.st"), "--quiet"]) == 0
    capfd.readouterr()
    assert main(["index", "build", str(tmp_path / "a.st"), str(tmp_path / "b.st"), "--kind", "ivf", "--nlist", "2",
                 "--out", str(tmp_path / "ix")]) == 0
    built = json.loads(capfd.readouterr().out)  # faiss's own progress lines do not end up in the JSON
    assert built["storage"] == "ondisk" and built["count"] == 50
    query = sorted((tmp_path / "b").rglob("*.png"))[0]
    assert main(["search", str(tmp_path / "ix"), str(query), "--k", "3", "--nprobe", "2", "--grid", ""]) == 0
    found = json.loads(capfd.readouterr().out)["results"][0]["neighbours"]
    assert found[0]["path"] == str(query.resolve()) and found[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert main(["index", "add", str(tmp_path / "ix"), str(tmp_path / "a.st")]) == 2
    assert "read-only" in capfd.readouterr().err
    assert main(["search", str(tmp_path / "ix"), str(query), "--k", "3", "--mmap", "--grid", ""]) == 0
