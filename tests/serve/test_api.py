"""The HTTP API through the ASGI app (httpx via FastAPI's TestClient): every route answers what the command line
answers for the same file — `vitkit predict`, `explain`, `embed`, `search` — alone and batched."""
import base64
import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from vitkit.cli import main

from .conftest import make_client, wait_ready

PNG = {"content-type": "image/png"}


def _close(a, b, tol=1e-5):
    return np.allclose(np.asarray(a, float), np.asarray(b, float), atol=tol, rtol=0)


def _same_prediction(api, cli):
    assert api["label"] == cli["label"]
    assert [t["label"] for t in api["topk"]] == [t["label"] for t in cli["topk"]]
    assert _close([t["prob"] for t in api["topk"]], [t["prob"] for t in cli["topk"]])


def test_classify_equals_vitkit_predict_in_every_body_form_and_batched(client, served):
    from vitkit.tasks.classify import predict

    ckpt, _, files, _, _ = served
    files = files[:12]
    cli = predict(ckpt, files, topk=5)
    for f, want in zip(files[:3], cli):
        data = f.read_bytes()
        for r in (client.post("/v1/classify", content=data, headers=PNG),
                  client.post("/v1/classify", files={"file": (f.name, data, "image/png")}),
                  client.post("/v1/classify", json={"image": base64.b64encode(data).decode()}),
                  client.post("/v1/classify", json={"image": "data:image/png;base64," +
                                                    base64.b64encode(data).decode()})):
            assert r.status_code == 200, r.text
            _same_prediction(r.json(), want)
    assert len(client.post("/v1/classify?topk=2", content=files[0].read_bytes(), headers=PNG).json()["topk"]) == 2
    before = _batches(client)
    with ThreadPoolExecutor(12) as pool:  # concurrent requests: batched by the worker, same answers
        got = list(pool.map(lambda f: client.post("/v1/classify", content=f.read_bytes(), headers=PNG), files))
    for r, want in zip(got, cli):
        _same_prediction(r.json(), want)
    count, total = (a - b for a, b in zip(_batches(client), before))
    assert total == len(files) and count < len(files), "concurrent requests were not batched"


def _batches(client, task="classify"):
    """(forwards, images) so far, from /metrics' batch-size histogram."""
    text = client.get("/metrics").text
    val = {k: float(line.split()[-1]) for line in text.splitlines() for k in ("count", "sum")
           if line.startswith(f'vitkit_batch_size_{k}{{task="{task}"}}')}
    return val.get("count", 0.0), val.get("sum", 0.0)


def test_classify_averages_the_test_time_views_the_checkpoint_records(served, tmp_path):
    """A run that planned 2-px shifted views: the API scores them as `vitkit predict` does, not the image alone."""
    import vitkit
    from vitkit.tasks.classify import predict

    ckpt, _, files, _, _ = served
    model = vitkit.load(ckpt)
    shifted = tmp_path / "shifted.safetensors"
    vitkit.save(model, shifted, class_names=list(model.pretrained_cfg["class_names"]),
                pretrained_cfg={**model.pretrained_cfg, "tta_shift": 2})
    cli, plain = predict(shifted, files[:3], topk=5), predict(ckpt, files[:3], topk=5)
    with make_client(checkpoint=str(shifted)) as c:
        wait_ready(c)
        for f, want, alone in zip(files[:3], cli, plain):
            r = c.post("/v1/classify", content=f.read_bytes(), headers=PNG)
            assert r.status_code == 200, r.text
            _same_prediction(r.json(), want)
            assert not _close([t["prob"] for t in r.json()["topk"]], [t["prob"] for t in alone["topk"]])


def test_explain_equals_vitkit_explain(client, served, tmp_path, capsys):
    ckpt, _, files, _, _ = served
    assert main(["explain", str(ckpt), str(files[0]), "--out", str(tmp_path)]) == 0
    want = json.loads((tmp_path / (files[0].stem + ".json")).read_text())
    capsys.readouterr()
    r = client.post("/v1/explain", content=files[0].read_bytes(), headers=PNG)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["predicted"] == want["predicted"] and got["grid"] == want["grid"] == [4, 4]
    assert _close(got["map"], want["map"], 2e-6) and _close(got["heads"], want["heads"], 2e-6)
    for key in ("image_png", "heat_png", "overlay_png", *[f"head_pngs.{i}" for i in range(4)]):
        k, _, i = key.partition(".")
        im = Image.open(io.BytesIO(base64.b64decode(got[k][int(i)] if i else got[k])))
        assert im.format == "PNG" and im.size == (224, 224)
    assert len(got["head_pngs"]) == 4
    att = client.post("/v1/explain?method=attention", content=files[0].read_bytes(), headers=PNG).json()
    assert att["method"] == "attention" and not _close(att["map"], got["map"])
    png = client.post("/v1/explain?format=png", content=files[0].read_bytes(), headers=PNG)
    assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")
    assert client.post("/v1/explain?method=magic", content=files[0].read_bytes(), headers=PNG).status_code == 422


def test_embed_equals_vitkit_embed(client, served):
    from vitkit.tasks.retrieve import Embeddings

    _, _, files, _, emb_file = served
    emb = Embeddings.load(emb_file)
    for f in files[:4]:
        got = client.post("/v1/embed", files={"file": (f.name, f.read_bytes(), "image/png")}).json()
        want = emb.vectors[emb.paths.index(str(f.resolve()))]
        assert got["dim"] == len(want) and got["pool"] == "prelogits"
        assert _close(got["embedding"], want)


def test_search_equals_vitkit_search_and_images_are_served_by_id_only(client, served, capsys):
    from vitkit.tasks.retrieve import Index

    ckpt, _, files, index, _ = served
    q = files[5]
    assert main(["search", str(index), str(q), "--k", "5", "--grid", ""]) == 0
    want = json.loads(capsys.readouterr().out)["results"][0]["neighbours"]
    got = client.post("/v1/search?k=5", content=q.read_bytes(), headers=PNG).json()["neighbours"]
    assert [n["id"] for n in got] == [n["id"] for n in want]
    assert _close([n["score"] for n in got], [n["score"] for n in want])
    assert got[0]["name"] == q.name and got[0]["label"] == q.parent.name
    assert all("/" not in n["name"] for n in got)  # the server's folders are not given away
    r = client.get(got[0]["thumbnail_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), np.asarray(Image.open(q)))
    n = len(Index.load(index))
    for bad, status in ((f"/v1/images/{n}", 404), ("/v1/images/-1", 404), ("/v1/images/..%2Fetc%2Fpasswd", 404), ("/v1/images/abc", 422),
                        ("/v1/images/%2Fetc%2Fpasswd", 404), ("/v1/images/0?size=100000", 422)):
        r = client.get(bad)
        assert r.status_code == status and "error" in r.json(), (bad, r.text)


def test_kserve_v2_protocol(client, served):
    from vitkit.io import load
    from vitkit.data.inputs import load_batch

    ckpt, _, files, _, _ = served
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    name = ckpt.stem
    meta = client.get(f"/v2/models/{name}").json()
    assert meta["inputs"][0]["shape"] == [-1, 1, 28, 28] and meta["outputs"][0]["shape"] == [-1, 10]
    assert client.get(f"/v2/models/{name}/ready").json()["ready"] is True
    x = load_batch(files[:3], load(ckpt))
    body = {"id": "q1", "inputs": [{"name": "input", "shape": [3, 1, 28, 28], "datatype": "FP32",
                                    "data": x.flatten().tolist()}]}
    out = client.post(f"/v2/models/{name}/infer", json=body).json()
    assert out["id"] == "q1" and out["model_name"] == name
    probs = np.asarray(out["outputs"][0]["data"]).reshape(out["outputs"][0]["shape"])
    for f, p, label in zip(files[:3], probs, out["outputs"][1]["data"]):
        top = client.post("/v1/classify?topk=10", content=f.read_bytes(), headers=PNG).json()["topk"]
        assert label == top[0]["label"]
        assert _close([p[int(t["label"])] for t in top], [t["prob"] for t in top])
    b64 = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                       "data": [base64.b64encode(files[0].read_bytes()).decode()]}]}
    assert _close(client.post(f"/v2/models/{name}/infer", json=b64).json()["outputs"][0]["data"], probs[0])
    assert client.post("/v2/models/nope/infer", json=body).status_code == 404
    body["inputs"][0]["shape"] = [3, 1, 28, 27]
    r = client.post(f"/v2/models/{name}/infer", json=body)
    assert r.status_code == 422 and "1, 28, 28" in r.json()["detail"]
    assert client.post(f"/v2/models/{name}/infer", json={"inputs": 3}).status_code == 422


def test_model_card_health_metrics_and_schema(client, served):
    ckpt = served[0]
    card = client.get("/v1/model").json()
    assert card["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert card["classes"] == [str(i) for i in range(10)] and card["config"]["depth"] == 3
    assert card["preprocessing"]["input_size"] == [1, 28, 28] and card["index"]["count"] == 40
    assert client.get("/healthz").json() == {"status": "live"}
    assert client.get("/readyz").json() == {"status": "ready"}
    text = client.get("/metrics").text
    for name in ("vitkit_requests_total", "vitkit_request_seconds_bucket", "vitkit_batch_size_bucket",
                 "vitkit_queue_depth", "vitkit_errors_total"):
        assert name in text, name
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/v1/classify", "/v1/explain", "/v1/embed", "/v1/search", "/v1/images/{image_id}", "/v1/model",
              "/v2/models/{name}/infer", "/healthz", "/readyz", "/metrics"):
        assert p in paths, p
    assert "multipart/form-data" in paths["/v1/classify"]["post"]["requestBody"]["content"]
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in page.text.replace("http-equiv", "")  # nothing loaded from elsewhere
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/..%2F__init__.py").status_code == 404


def test_model_card_has_the_training_figures_in_the_run_folder_and_with_a_bare_checkpoint(tmp_path):
    """Training puts a compact report into its checkpoints, so the card shows the held-out figures, epochs, steps,
    time, data and date both for a run folder and for its best.safetensors copied elsewhere; `vitkit eval`'s
    eval.json beside the file shows as the latest evaluation."""
    import json
    import shutil

    from _runs import tiny_task, tiny_tc
    from vitkit.tasks.classify import evaluate_checkpoint, train_classifier

    tiny = {"embed_dim": 32, "depth": 1, "num_heads": 2, "global_pool": "avg"}
    train_classifier(tiny_task(tiny, 128, 32), tiny_tc(tmp_path, "run", epochs=2))
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    bare = tmp_path / "elsewhere" / "model.safetensors"
    bare.parent.mkdir()
    shutil.copyfile(run / "best.safetensors", bare)
    evaluate_checkpoint(bare, "mnist5k", max_val=20)
    cards = {}
    for name, path in (("run", run), ("bare", bare)):
        with make_client(checkpoint=str(path), warmup=False) as c:
            cards[name] = wait_ready(c).get("/v1/model").json()["report"]
    for card in cards.values():
        for k in ("top1", "top5"):
            assert card[k] == pytest.approx(report["eval"][k], abs=1e-4), (k, card)
        assert (card["epochs"], card["steps"]) == (2, report["steps"])
        assert card["eval_images"] == report["eval"]["num_images"]
        assert card["train_seconds"] == pytest.approx(report["train_seconds"]) and card["name"] == "run"
    bare_card = cards["bare"]
    assert bare_card["source"] == "checkpoint" and bare_card["data"]["num_classes"] == 10
    assert bare_card["data"]["num_train"] == 128 and bare_card["date"][:2] == "20" and bare_card["vitkit_version"]
    assert bare_card["latest_eval"]["num_images"] == 20 and bare_card["latest_eval"]["data"] == "mnist5k"
    assert "latest_eval" not in cards["run"]  # no eval.json in the run folder


def test_docs_are_served_by_the_app(client):
    """/docs (Swagger UI) loads its script, style and icon from the server itself, not a CDN: it works offline."""
    import re

    page = client.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", page.text)
    assert {"/openapi.json", "/static/swagger-ui-bundle.js", "/static/swagger-ui.css"} <= set(urls), urls
    assert not [u for u in urls if "//" in u], urls  # same origin only
    assert "validatorUrl" in page.text  # Swagger UI would otherwise send the schema to validator.swagger.io
    for url, ctype in (("/static/swagger-ui-bundle.js", "text/javascript"), ("/static/swagger-ui.css", "text/css"),
                       ("/static/favicon-32x32.png", "image/png")):
        r = client.get(url)
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype) and len(r.content) > 500, url
    assert "SwaggerUIBundle" in client.get("/static/swagger-ui-bundle.js").text
    assert client.get("/redoc").status_code == 404  # ReDoc is off: it would load from a CDN


def test_fast_serving_picks_its_precision_on_the_index_images(served, monkeypatch, tmp_path, caplog):
    """--fast (the default) with precision auto: measured at max_batch_size when the server starts, agreement
    checked on the index's real images, the pick on the model card; labels as the plain path gives them."""
    monkeypatch.setenv("VITKIT_CACHE", str(tmp_path / "cache"))
    ckpt, _, files, index, _ = served
    with caplog.at_level("INFO"), make_client(checkpoint=str(ckpt), index=str(index), fast=True,
                                              max_batch_size=8) as c:
        wait_ready(c)
        card = c.get("/v1/model").json()
        fast_labels = [c.post("/v1/classify", files={"file": (f.name, f.read_bytes(), "image/png")}).json()["label"] for f in files[:5]]
    assert card["precision"] in ("fp32", "bf16", "int8")
    # fp32 and int8 at least are candidates on the CPU's oneDNN path, so auto measured and chose
    assert card["precision_choice"]["batch"] == 8 and card["precision_choice"]["precision"] == card["precision"]
    assert any("agreement checked (and its int8 candidate calibrated) on 8 real images" in r.getMessage()
               for r in caplog.records)
    with make_client(checkpoint=str(ckpt)) as c:
        wait_ready(c)
        plain = [c.post("/v1/classify", files={"file": (f.name, f.read_bytes(), "image/png")}).json()["label"] for f in files[:5]]
    assert fast_labels == plain
    from vitkit.serve import ServeConfig
    from vitkit.errors import ConfigError

    with pytest.raises(ConfigError, match="precision must be"):
        ServeConfig(checkpoint=str(ckpt), precision="fp16")


def test_serve_runs_uvicorn_on_asyncio_and_h11_even_with_uvloop_installed(served, monkeypatch):
    """uvicorn takes uvloop and httptools when they are installed; with them vitkit's server measured ~12% fewer
    requests per second (docs/serve.md), so `serve` asks for asyncio and h11 by name."""
    import uvicorn

    from vitkit.serve import ServeConfig, serve

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    serve(ServeConfig(str(served[0])), port=8123)
    assert seen["loop"] == "asyncio" and seen["http"] == "h11" and seen["port"] == 8123
