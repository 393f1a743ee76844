"""The engine-core process and its client (server/engine_core.py, server/core_client.py).

The wire protocol is driven directly (the real EngineCore loop over real pipes, on a thread of
this process so a test can break a step), and end to end: a real loopback server whose engine
process is killed mid-stream must fail the stream with a clear error, report unhealthy, and
refuse new work, never hang."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import threading
import time
from multiprocessing import Pipe

import httpx
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from tesela import LLM, SamplingParams  # noqa: E402
from tesela.engine.llm_engine import LLMEngine, make_engine_config  # noqa: E402
from tesela.engine_args import EngineArgs  # noqa: E402
from tesela.server import engine_core as core  # noqa: E402
from tesela.server.app import ServerThread, create_process_app  # noqa: E402
from tesela.server.async_engine import EngineError  # noqa: E402
from tesela.server.core_client import EngineCoreClient  # noqa: E402
from tesela.server.engine_core import EngineCore, EngineFacts  # noqa: E402

TIMEOUT = 30.0
PROMPT = [5, 17, 42, 8, 99, 3]


class CoreOnThread:
    """An EngineCore run on a thread over real pipes; quacks like the engine process."""

    def __init__(self, engine: LLMEngine) -> None:
        commands_out, self.commands = Pipe(duplex=False)
        self.outputs, outputs_in = Pipe(duplex=False)
        self.core = EngineCore(engine, commands_out, outputs_in)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.pid, self.exitcode = os.getpid(), None

    def _run(self) -> None:
        self.core.run()
        self.core.outputs.close()  # as the process's exit would: the reader sees EOF
        self.exitcode = 0

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout=None) -> None:
        self.thread.join(timeout)

    def kill(self) -> None:
        raise AssertionError("the core did not stop when asked")


@pytest.fixture(scope="module")
def engine():
    config, path = make_engine_config("tiny", overlap_schedule=True)
    return LLMEngine(config, path)


def recv(connection, timeout: float = TIMEOUT):
    assert connection.poll(timeout), "the engine core sent nothing"
    return connection.recv()


def test_one_compact_message_per_step_rebuilds_the_offline_text(engine):
    params = SamplingParams(
        max_tokens=120, temperature=0, ignore_eos=True, logprobs=1, prompt_logprobs=1
    )
    expected = LLM("tiny").generate(PROMPT, params)[0]
    handle = CoreOnThread(engine)
    handle.commands.send((core.ADD, "g", ["g-0"], [PROMPT], [params], None, None))
    assert recv(handle.outputs) == (core.ADDED, "g", None)
    text, tokens, logprobs, sizes, prompt_logprobs = "", [], [], [], []
    while True:
        message = recv(handle.outputs)
        assert message[0] == core.STEP and len(message[1]) == 1
        sizes.append(len(pickle.dumps(message)))
        request_id, new_ids, keep, tail, new_logprobs, finished, reason, _, prompt = message[1][0]
        prompt_logprobs += [prompt] if prompt is not None else []
        assert request_id == "g-0" and len(new_ids) == len(new_logprobs) <= 1
        text, tokens = text[:keep] + tail, tokens + new_ids
        logprobs += new_logprobs
        if finished:
            break
    handle.commands.send((core.STOP,))
    handle.join(TIMEOUT)
    assert (text, tokens, reason) == (expected.text, expected.token_ids, expected.finish_reason)
    assert [lp.token_id for lp in logprobs] == expected.token_ids
    assert len(prompt_logprobs) == 2  # the first and the last output carry them, no other
    assert prompt_logprobs[0] == prompt_logprobs[1] == expected.prompt_logprobs
    # Deltas only: late steps' messages are no bigger than early ones (the first and last
    # also carry the prompt logprobs).
    assert max(sizes[-10:-1]) <= 1.5 * max(sizes[1:10])
    assert not handle.core.live and engine.stats()["kv_blocks_used"] == 0


def test_the_core_stops_when_its_frontend_goes_away(engine):
    handle = CoreOnThread(engine)
    params = SamplingParams(max_tokens=500, ignore_eos=True)
    handle.commands.send((core.ADD, "g", ["g-0"], [PROMPT], [params], None, None))
    assert recv(handle.outputs) == (core.ADDED, "g", None)
    handle.commands.close()  # the frontend died mid-request
    handle.join(TIMEOUT)
    assert not handle.is_alive()
    engine.abort("g-0")


def client_for(engine: LLMEngine) -> tuple[EngineCoreClient, CoreOnThread]:
    handle = CoreOnThread(engine)
    facts = EngineFacts.of(engine, None)
    return EngineCoreClient(handle, handle.commands, handle.outputs, facts), handle


async def generate(client: EngineCoreClient, max_tokens: int) -> list:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    group = await client.submit([PROMPT, PROMPT], [params, params])
    final = {}
    async for latest in group.outputs():
        final.update(latest)
    return [final[i].token_ids for i in sorted(final)]


def test_a_failed_step_fails_only_its_requests_and_the_core_keeps_serving(engine, caplog):
    client, handle = client_for(engine)
    original, calls = engine.step, {"n": 0}

    def failing_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected fault")
        return original()

    async def scenario():
        client.start()
        engine.step = failing_step
        try:
            with pytest.raises(EngineError, match="the engine failed"):
                await generate(client, 20)
        finally:
            engine.step = original
        assert client.num_pending == 0 and client.is_running
        stats = await client.fetch_stats()
        assert stats["kv_blocks_used"] == 0 and stats["num_running"] == 0
        return await generate(client, 5)

    tokens = asyncio.run(asyncio.wait_for(scenario(), 60))
    expected = LLM("tiny").generate(PROMPT, SamplingParams(max_tokens=5, temperature=0))[0]
    assert tokens == [expected.token_ids] * 2
    logged = [r for r in caplog.records if r.exc_info and "injected fault" in str(r.exc_info[1])]
    assert len(logged) == 1 and "grp-0-0" in logged[0].getMessage()
    client.shutdown(TIMEOUT)
    assert not handle.is_alive()


@pytest.fixture(scope="module")
def doomed_server():
    """A server of its own: its engine process is killed by the test."""
    app = create_process_app(EngineArgs.from_kwargs("tiny"), max_queue_len=4, torch_threads=1)
    server = ServerThread(app)
    server.start(timeout=TIMEOUT)
    server.engine = app.state.server.engine
    yield server
    server.stop()


def test_a_dead_engine_process_fails_streams_and_reports_unhealthy(doomed_server):
    url, frontend = doomed_server.url, doomed_server.engine
    assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200
    body = {
        "model": "tiny",
        "prompt": "doomed",
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }
    events = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    os.kill(frontend.process.pid, signal.SIGKILL)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "engine process exited unexpectedly" in error["message"] and "-9" in error["message"]
    deadline = time.monotonic() + 5
    while httpx.get(url + "/health", timeout=TIMEOUT).status_code != 503:
        assert time.monotonic() < deadline, "/health still says ok"
        time.sleep(0.05)
    refused = httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=TIMEOUT)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
    assert frontend.num_pending == 0


def test_a_user_error_at_startup_reaches_the_caller_as_itself(tmp_path):
    with pytest.raises(ValueError, match="neither a folder nor a preset"):
        create_process_app(EngineArgs.from_kwargs(str(tmp_path / "no-such-model")))


@pytest.mark.parametrize("in_process", [False, True])
def test_a_tensor_parallel_engine_serves_over_http(in_process):
    """`tesela serve --tensor-parallel-size 2` (gloo on CPU): the server starts (it lists the
    models and adapters of a runner without LoRA), answers like the offline engine at TP 1, and
    its shutdown stops the worker process too."""
    from tesela.server.app import create_app

    args = EngineArgs.from_kwargs("tiny", tensor_parallel_size=2)
    engine = None  # in process: this process joins the group, and must leave it after
    if in_process:
        engine = LLMEngine(*make_engine_config(args))
        app = create_app(engine)
    else:
        app = create_process_app(args, torch_threads=1)
    body = {"model": "tiny", "prompt": "tensor parallel", "max_tokens": 8, "temperature": 0}
    try:
        with ServerThread(app) as server:
            models = httpx.get(server.url + "/v1/models", timeout=TIMEOUT).json()
            served = httpx.post(server.url + "/v1/completions", json=body, timeout=TIMEOUT)
    finally:
        if engine is not None:
            engine.shutdown()
    served = served.json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    params = SamplingParams(max_tokens=8, temperature=0)
    expected = LLM("tiny").generate(["tensor parallel"], params)[0]
    assert served["choices"][0]["text"] == expected.text
