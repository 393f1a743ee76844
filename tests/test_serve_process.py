"""`tesela serve` as a real process (its engine in a process of its own, or in process with
--engine-in-process): SIGTERM with requests in flight drains, ends open streams with an error
event and [DONE], answers the rest with a 503, and exits 0 with one log line; a busy port
fails before the model loads."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60.0


def spawn_server(*flags: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "tesela.cli", "serve", "--port", "0", "--no-access-log", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )


class Log:
    """Collects the server's output on a thread; waits for a line."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self.thread.start()

    def _read(self, process) -> None:
        for line in process.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(self.lines)}")


def start_server(*flags: str) -> tuple[subprocess.Popen, Log, str]:
    process = spawn_server(*flags)
    log = Log(process)
    url = log.wait_for(r"at (http://[\d.]+:\d+)/v1").group(1)
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, log, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "".join(log.lines)
        time.sleep(0.1)


def stream_events(url: str, body: dict, first_event: threading.Event | None = None) -> list:
    """The data of every SSE event of a streamed completion."""
    events = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if first_event is not None:
                    first_event.set()
    return events


@pytest.mark.parametrize("engine_mode", [[], ["--engine-in-process"]], ids=["process", "thread"])
def test_sigterm_drains_then_ends_open_streams_cleanly(engine_mode):
    # Exit 0 within the timeout also says the engine process stopped: the server joins it.
    # A 1 s drain: the 2000-token requests (>= 1 ms a token on CPU) cannot finish within it.
    process, log, url = start_server("--drain-timeout", "1", "--max-num-seqs", "4", *engine_mode)
    long = {"model": "tiny", "prompt": "long", "max_tokens": 2000, "ignore_eos": True}
    medium = {"model": "tiny", "prompt": "medium", "max_tokens": 8, "ignore_eos": True}
    medium_started, stream_started = threading.Event(), threading.Event()
    results: dict[str, object] = {}
    jobs = {
        "stream": lambda: stream_events(url, {**long, "stream": True}, stream_started),
        "whole": lambda: httpx.post(url + "/v1/completions", json=long, timeout=TIMEOUT),
        "medium": lambda: stream_events(url, {**medium, "stream": True}, medium_started),
    }
    threads = [
        threading.Thread(target=lambda k=k, f=f: results.__setitem__(k, f()))
        for k, f in jobs.items()
    ]
    for thread in threads:
        thread.start()
    assert medium_started.wait(TIMEOUT) and stream_started.wait(TIMEOUT)
    # The whole (unstreamed) one admitted too before the signal: a request still in its socket
    # when the listener closes was never in flight (on a loaded machine the threads' sends can
    # trail the medium's first token).
    deadline = time.monotonic() + TIMEOUT
    while httpx.get(url + "/stats", timeout=TIMEOUT).json()["num_pending"] < (
        2 if "medium" in results else 3
    ):
        assert time.monotonic() < deadline, "the requests were never all in flight"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)  # the medium request may have tokens still to go
    for thread in threads:
        thread.join(TIMEOUT)
    assert process.wait(TIMEOUT) == 0
    output = "".join(log.lines)

    # Running requests finish within the drain timeout...
    medium_events = results["medium"]
    assert medium_events[-1] == "[DONE]"
    assert json.loads(medium_events[-2])["choices"][0]["finish_reason"] == "length"
    # ...the rest are cut off: streams with an error event and [DONE], others with a 503.
    events = results["stream"]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "shutting_down"
    assert all("choices" in json.loads(e) for e in events[:-2])
    whole = results["whole"]
    assert whole.status_code == 503 and whole.json()["error"]["code"] == "shutting_down"
    assert len(re.findall(r"shutdown: .* 2 cut off", output)) == 1, output
    assert "Traceback" not in output and "CancelledError" not in output, output


def test_a_busy_port_fails_before_the_model_loads():
    process, log, url = start_server()
    try:
        port = url.rsplit(":", 1)[1]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        started = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "tesela.cli", "serve", "--port", port],
            capture_output=True,
            text=True,
            env=env,
            timeout=TIMEOUT,
        )
        assert second.returncode == 2
        assert f"cannot listen on 127.0.0.1:{port}" in second.stderr
        assert "serving" not in second.stderr and "Traceback" not in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        assert time.monotonic() - started < 20
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(TIMEOUT)
