"""LoRA over a live server on loopback (engine in its own process): adapters as models, load/unload at run time, metrics."""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from tesela import LLM, LoRARequest, SamplingParams  # noqa: E402
from tesela.engine_args import EngineArgs  # noqa: E402
from tesela.server.app import ServerThread, create_process_app  # noqa: E402

TIMEOUT = 30.0
PROMPT = [5, 17, 42, 8, 99, 3]


@pytest.fixture(scope="module")
def setup(checkpoints, lora_adapters):
    path, _ = checkpoints["llama"]
    folders = {name: lora_adapters["llama"][name][0].lora_path for name in ("full", "rslora")}
    kwargs = dict(dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8)
    # The engine in an engine-core process, as `tesela serve --lora-modules sql=...` runs it.
    sql = LoRARequest("sql", 1, str(folders["full"]))
    engine_args = EngineArgs.from_kwargs(str(path), **kwargs)
    app = create_process_app(engine_args, [sql], served_model_name="base", torch_threads=1)
    server = ServerThread(app)
    server.start(timeout=TIMEOUT)
    offline = LLM(str(path), **kwargs)
    yield server, folders, offline
    server.stop()


def complete(server, model: str) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    return httpx.post(server.url + "/v1/completions", json=body, timeout=TIMEOUT)


def tokens_offline(offline, lora) -> str:
    sp = SamplingParams(max_tokens=5, temperature=0)
    return offline.generate(PROMPT, sp, lora_request=lora)[0].text


def test_adapters_are_models_loaded_and_unloaded_at_run_time(setup, tmp_path):
    server, folders, offline = setup
    models = httpx.get(server.url + "/v1/models", timeout=TIMEOUT).json()["data"]
    assert [(m["id"], m["parent"]) for m in models] == [("base", None), ("sql", "base")]
    base, sql = complete(server, "base"), complete(server, "sql")
    assert base.status_code == sql.status_code == 200
    assert base.json()["choices"][0]["text"] == tokens_offline(offline, None)
    expected_sql = tokens_offline(offline, LoRARequest("sql", 1, str(folders["full"])))
    assert sql.json()["choices"][0]["text"] == expected_sql != base.json()["choices"][0]["text"]
    assert sql.json()["model"] == "sql"

    load = server.url + "/v1/load_lora_adapter"
    assert complete(server, "chat").status_code == 404
    ok = httpx.post(load, json={"lora_name": "chat", "lora_path": str(folders["rslora"])})
    assert ok.status_code == 200, ok.text
    chat = complete(server, "chat")
    expected = tokens_offline(offline, LoRARequest("chat", 2, str(folders["rslora"])))
    assert chat.status_code == 200 and chat.json()["choices"][0]["text"] == expected
    ids = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
    assert ids == ["base", "chat", "sql"]

    # Bad adapters: 4xx with a message, and the server keeps serving.
    missing = httpx.post(load, json={"lora_name": "x", "lora_path": str(tmp_path / "none")})
    assert missing.status_code == 400 and "does not exist" in missing.json()["error"]["message"]
    assert httpx.post(load, json={"lora_name": "sql", "lora_path": "y"}).status_code == 400
    assert httpx.post(load, json={"lora_path": "y"}).status_code == 400

    unload = server.url + "/v1/unload_lora_adapter"
    assert httpx.post(unload, json={"lora_name": "chat"}).status_code == 200
    assert complete(server, "chat").status_code == 404
    assert httpx.post(unload, json={"lora_name": "chat"}).status_code == 404
    assert complete(server, "sql").json()["choices"][0]["text"] == expected_sql

    metrics = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    prefix = 'tesela_lora_requests_total{model_name="base",lora_name='
    assert f'{prefix}"sql"}} 2' in metrics
    assert f'{prefix}"chat"}} 1' in metrics
    assert f'{prefix}""}} 1' in metrics  # the base model
