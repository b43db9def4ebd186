"""The embedded stack of ``tuneloop up`` and ``tuneloop demo``: the Temporal dev server (unless
``TEMPORAL_ADDRESS`` names one), the API with the local serving backend, and one worker on both
queues, all on the same database."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import uvicorn

from api.app import create_app
from core.db import create_engine
from core.settings import ApiSettings
from tuneloop.runtime import ensure_schema
from workflows.devserver import start_dev_server, stop
from workflows.worker import run_worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stack:
    api_url: str
    temporal_address: str
    temporal_ui: str | None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def embedded_stack(
    settings: ApiSettings, *, temporal_port: int = 7233, ui_port: int = 8233
) -> AsyncIterator[Stack]:
    engine = create_engine(settings)
    await ensure_schema(engine, settings)
    server_proc = None
    address, ui = settings.temporal_address, None
    if address is None:
        if not _port_free(temporal_port):
            raise RuntimeError(
                f"port {temporal_port} is taken: stop what uses it, or set TEMPORAL_ADDRESS"
            )
        ui_port = ui_port if _port_free(ui_port) else free_port()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        server_proc = await asyncio.to_thread(
            start_dev_server,
            port=temporal_port,
            ui_port=ui_port,
            db_file=settings.data_dir / "temporal.db",
            log_file=settings.data_dir / "temporal.log",
        )
        address, ui = f"127.0.0.1:{temporal_port}", f"http://127.0.0.1:{ui_port}"
    settings = settings.model_copy(update={"temporal_address": address})
    app = create_app(settings, engine=engine)
    server = uvicorn.Server(
        uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning")
    )
    # uvicorn would take over SIGINT/SIGTERM; the caller decides when the stack stops.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign, assignment]
    api_task = asyncio.create_task(server.serve())
    stop_worker = asyncio.Event()
    # The worker shares the API's engine: a promotion preloads its version where it is served.
    worker_task = asyncio.create_task(
        run_worker(settings, queue="all", stop=stop_worker, serving=app.state.backend)
    )
    try:
        while not server.started:
            if api_task.done():
                await api_task
                raise RuntimeError(f"the API could not listen on {settings.host}:{settings.port}")
            await asyncio.sleep(0.05)
        yield Stack(f"http://{settings.host}:{settings.port}", address, ui)
    finally:
        stop_worker.set()
        server.should_exit = True
        await asyncio.gather(api_task, worker_task, return_exceptions=True)
        await app.state.backend.close()
        await engine.dispose()
        if server_proc is not None:
            await asyncio.to_thread(stop, server_proc)
