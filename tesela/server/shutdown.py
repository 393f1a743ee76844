"""Graceful shutdown: uvicorn's Server with a drain, and a normal exit after a signal.

On SIGTERM (or SIGINT) the server stops accepting connections and refuses new requests on
open ones (503); running requests get `drain_timeout` seconds to finish; whatever is left is
then ended by the engine (streams get an error event and [DONE], others a 503). One log line
says what happened, and the process exits 0: uvicorn would re-raise the signal instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time

import uvicorn

logger = logging.getLogger("tesela.server")


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain_timeout: float) -> None:
        super().__init__(config)
        self.drain_timeout = drain_timeout

    async def shutdown(self, sockets=None) -> None:
        # uvicorn closes the listeners and waits for open connections; meanwhile the drain
        # ends the requests that outlive the timeout, which lets those connections close.
        drain = asyncio.ensure_future(drain_engine(self.config.app, self.drain_timeout))
        try:
            await super().shutdown(sockets)
        finally:
            await drain

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


async def drain_engine(app, drain_timeout: float) -> None:
    """Refuse new requests, wait for running ones up to `drain_timeout`, cut off the rest."""
    engine = app.state.server.engine
    start = time.monotonic()
    engine.begin_drain()
    in_flight = engine.num_pending
    while engine.num_pending and time.monotonic() - start < drain_timeout:
        await asyncio.sleep(0.05)
    cut = 0
    if engine.num_pending:
        cut = engine.cut_off("the server is shutting down: this request was cut off")
    logger.warning(
        "shutdown: %d sequence(s) in flight, %d finished within the %.0f s drain, %d cut off",
        in_flight,
        max(in_flight - cut, 0),
        drain_timeout,
        cut,
    )
