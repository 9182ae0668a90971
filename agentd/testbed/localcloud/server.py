"""`LocalCloud`: both servers on one private asyncio loop in one thread.

Tests and `agentd demo` run Trio in the main thread; localcloud must not
touch that loop, so `start()` spawns a thread running `asyncio.run`, binds
the gRPC port (Speech + TextToSpeech on one grpc.aio server) and the HTTP
port, and returns once both are serving. `stop()` wakes that loop, which
cancels live RPCs and connections, drains the STT worker pool and ends the
thread. Settings and faults live in a `CloudState`, safe to change from any
thread while serving.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from agentd.testbed.localcloud.http_server import OpenAiHttpServer
from agentd.testbed.localcloud.settings import CloudState, Faults, LocalCloudSettings
from agentd.testbed.localcloud.speech_service import SpeechService
from agentd.testbed.localcloud.stt_engines import DecoderPool, ScriptCursor
from agentd.testbed.localcloud.tts_service import TextToSpeechService

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
GRPC_STOP_GRACE_S = 0.2
STT_WORKERS = 4


class LocalCloud:
    """A local Google Speech/TTS + OpenAI chat double on 127.0.0.1.

    Use as `with LocalCloud(settings) as cloud:` or `start()`/`stop()`.
    """

    def __init__(self, settings: LocalCloudSettings | None = None) -> None:
        self._state = CloudState(settings or LocalCloudSettings())
        self._pool = DecoderPool()
        self._script_cursor = ScriptCursor()  # survives stop()/start(), like the recognizer it stands for
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._ports: tuple[int, int] | None = None
        self._startup_error: BaseException | None = None

    def __enter__(self) -> LocalCloud:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def grpc_target(self) -> str:
        """"HOST:PORT" of the gRPC server (Speech and TextToSpeech)."""
        return f"{self._state.settings.host}:{self._bound_ports()[0]}"

    @property
    def http_base_url(self) -> str:
        """The OpenAI-compatible base URL, ".../v1"."""
        return f"http://{self._state.settings.host}:{self._bound_ports()[1]}/v1"

    @property
    def settings(self) -> LocalCloudSettings:
        return self._state.settings

    def configure(self, **changes: Any) -> LocalCloudSettings:
        """Change settings at runtime (host and ports only matter at start)."""
        return self._state.configure(**changes)

    def set_faults(self, **changes: Any) -> Faults:
        """Change injected faults at runtime; unnamed faults keep their value."""
        return self._state.set_faults(**changes)

    def clear_faults(self) -> Faults:
        """Turn every fault off."""
        return self._state.configure(faults=Faults()).faults

    def stats(self) -> dict[str, Any]:
        """Request counters and the last chat request body (see CloudState.stats)."""
        return self._state.stats()

    def start(self) -> None:
        """Bind the ports and serve from a background thread; returns when serving."""
        if self._thread is not None:
            raise RuntimeError("LocalCloud already started")
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="localcloud", daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT_S):
            raise RuntimeError("localcloud did not start in time")
        if self._startup_error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError(f"localcloud failed to start: {self._startup_error}") from self._startup_error

    def stop(self) -> None:
        """Cancel live calls and stop serving; returns when the thread has ended."""
        thread, loop, stop_requested = self._thread, self._loop, self._stop_requested
        if thread is None:
            return
        if loop is not None and stop_requested is not None:
            loop.call_soon_threadsafe(stop_requested.set)
        thread.join(STOP_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError("localcloud did not stop in time")
        self._thread = self._loop = self._stop_requested = None
        self._ports = None

    def _bound_ports(self) -> tuple[int, int]:
        if self._ports is None:
            raise RuntimeError("LocalCloud is not running")
        return self._ports

    def _run(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._serve(ready))
        except BaseException as exc:  # reported to start(); after startup this is a localcloud bug
            if ready.is_set():
                raise
            self._startup_error = exc
            ready.set()

    async def _serve(self, ready: threading.Event) -> None:
        settings = self._state.settings
        executor = ThreadPoolExecutor(STT_WORKERS, thread_name_prefix="localcloud-stt")
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers(
            (
                SpeechService(self._state, self._pool, executor, script_cursor=self._script_cursor).generic_handler(),
                TextToSpeechService(self._state).generic_handler(),
            )
        )
        http = OpenAiHttpServer(self._state)
        try:
            grpc_port = server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
            await server.start()
            http_port = await http.start(settings.host, settings.http_port)
            if settings.stt_engine == "pocketsphinx":  # load one decoder now, not in the first call
                loop = asyncio.get_running_loop()
                self._pool.release(await loop.run_in_executor(executor, self._pool.acquire))
            self._ports = (grpc_port, http_port)
            self._loop = asyncio.get_running_loop()
            self._stop_requested = asyncio.Event()
            ready.set()
            await self._stop_requested.wait()
        finally:
            await server.stop(GRPC_STOP_GRACE_S)
            await http.close()
            executor.shutdown(wait=True, cancel_futures=True)
