"""localcloud's knobs: latency settings, injected faults, and request counters.

`LocalCloudSettings` and `Faults` are frozen values. `CloudState` holds the
current pair behind a lock and swaps in a new value on every change, so the
service code (on localcloud's asyncio thread) reads one consistent snapshot
with a plain attribute read while tests (on the Trio main thread) change it.
The only mutable counters (`stats`, the `stt_fail_opens` and
`stt_abort_streams` countdowns) are updated under the same lock.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

STT_ENGINES = ("script", "pocketsphinx")


class RuleLike(Protocol):
    """What the `rules` LLM engine reads from an `agentd.config.Rule`."""

    keywords: tuple[str, ...]
    reply: str
    tool: str
    arguments: str
    after_tool: str


class BusinessLike(Protocol):
    """What localcloud reads from an `agentd.config.Business`."""

    name: str
    system_prompt: str
    rules: tuple[RuleLike, ...]
    fallback_reply: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Faults:
    """Failures to inject. All off by default; see each field for its effect."""

    stt_fail_opens: int = 0  # reject the next N StreamingRecognize calls with UNAVAILABLE
    stt_abort_after_s: float = 0.0  # >0: abort every stream after that much audio, UNAVAILABLE
    stt_abort_streams: int = -1  # with stt_abort_after_s: abort only N more streams (-1: every stream)
    llm_http_status: int = 0  # e.g. 429/500: answer chat requests with that status
    llm_inband_error: bool = False  # HTTP 200, then `data: {"error": ...}` after the first token
    llm_cut_after_tokens: int = -1  # >=0: drop the connection after N tokens, no [DONE]
    llm_stall_first_token: bool = False  # send headers and ": ping", then never a token
    llm_tool_name: str = ""  # non-empty: every tool call the rules make names this tool instead
    llm_tool_arguments: str = ""  # non-empty: every tool call the rules make carries this arguments text
    tts_error: bool = False  # TTS calls fail with INTERNAL
    tts_empty_audio: bool = False  # SynthesizeSpeech returns empty audio_content
    tts_bad_riff: bool = False  # SynthesizeSpeech returns a malformed RIFF container
    tts_delay_ms: int = 0  # extra delay before every TTS answer
    tts_fail_text: str = ""  # TTS calls whose input text contains this fail with INTERNAL (a later sentence)


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalCloudSettings:
    """Everything localcloud can be told. Ports 0 pick a free port at start.

    host/grpc_port/http_port only matter at start; everything else is read
    live by the services, so `LocalCloud.configure` changes it at runtime.
    """

    host: str = "127.0.0.1"
    grpc_port: int = 0
    http_port: int = 0
    stt_engine: str = "script"
    script_lines: tuple[str, ...] = ()
    stt_final_delay_ms: int = 150
    stt_partial_interval_ms: int = 120
    stt_segment_gap_ms: int = 300
    stt_vad_threshold_dbfs: float = -45.0
    stt_stream_limit_s: float = 305.0
    stt_audio_timeout_s: float = 10.0
    stt_script_shared: bool = False  # script engine: one line cursor for all streams (stt_engines.ScriptCursor)
    llm_model: str = "localcloud-rules"
    llm_ttft_ms: int = 0
    llm_tokens_per_s: float = 0.0  # 0 = all tokens at once
    tts_ttfb_ms: int = 0
    # Synthesize each (text, language, rate) once and keep the audio: for load generators, where
    # espeak-ng (a process per request) would otherwise be the bottleneck measured, not agentd.
    tts_cache: bool = False
    businesses: Mapping[str, BusinessLike] = field(default_factory=lambda: MappingProxyType({}))
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        if self.stt_engine not in STT_ENGINES:
            raise ValueError(f"stt_engine must be one of {STT_ENGINES}, got {self.stt_engine!r}")
        if self.stt_partial_interval_ms <= 0 or self.stt_segment_gap_ms <= 0:
            raise ValueError("stt_partial_interval_ms and stt_segment_gap_ms must be > 0")
        if self.stt_stream_limit_s <= 0 or self.stt_audio_timeout_s <= 0:
            raise ValueError("stt_stream_limit_s and stt_audio_timeout_s must be > 0")
        if self.llm_tokens_per_s < 0:
            raise ValueError("llm_tokens_per_s must be >= 0")
        object.__setattr__(self, "script_lines", tuple(self.script_lines))
        object.__setattr__(self, "businesses", MappingProxyType(dict(self.businesses)))


def settings_from_config(config: Any, **overrides: Any) -> LocalCloudSettings:
    """Settings whose `businesses` come from an `agentd.config.Config`."""
    return LocalCloudSettings(businesses=config.businesses, **overrides)


def read_script(path: str) -> tuple[str, ...]:
    """Script lines from a UTF-8 file: one line per voiced segment, blank lines skipped."""
    with open(path, encoding="utf-8") as handle:
        return tuple(line.strip() for line in handle if line.strip())


_COUNTERS = (
    "streams_opened",
    "active_streams",
    "recognize_calls",
    "synth_calls",
    "tts_cache_hits",  # requests answered from tts_cache without running espeak-ng
    "streaming_synth_calls",
    "list_voices_calls",
    "chat_calls",
    "active_chats",  # chat requests being answered now (a stalled one ends when the client hangs up)
    "chat_prompt_tokens",  # words of the messages of every chat request answered (tokens = words here)
    "chat_tokens_sent",  # reply words actually sent: a client that hangs up early stops the count
)


class CloudState:
    """Thread-safe home of the current settings, faults and counters."""

    def __init__(self, settings: LocalCloudSettings) -> None:
        self._lock = threading.Lock()
        self._settings = settings
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._last_chat_request: dict[str, Any] | None = None

    @property
    def settings(self) -> LocalCloudSettings:
        """The current snapshot (never mutated; replaced on change)."""
        return self._settings

    @property
    def faults(self) -> Faults:
        return self._settings.faults

    def configure(self, **changes: Any) -> LocalCloudSettings:
        """Replace settings fields (validated); returns the new snapshot."""
        with self._lock:
            self._settings = dataclasses.replace(self._settings, **changes)
            return self._settings

    def set_faults(self, **changes: Any) -> Faults:
        """Replace fault fields; `Faults()` fields not named keep their value."""
        with self._lock:
            faults = dataclasses.replace(self._settings.faults, **changes)
            self._settings = dataclasses.replace(self._settings, faults=faults)
            return faults

    def take_stt_fail_open(self) -> bool:
        """Consume one pending `stt_fail_opens`; True if this open must fail."""
        with self._lock:
            remaining = self._settings.faults.stt_fail_opens
            if remaining <= 0:
                return False
            faults = dataclasses.replace(self._settings.faults, stt_fail_opens=remaining - 1)
            self._settings = dataclasses.replace(self._settings, faults=faults)
            return True

    def take_stt_abort(self) -> bool:
        """A stream reached `stt_abort_after_s`: must it abort? Consumes one of
        `stt_abort_streams` when that countdown is on (>= 0)."""
        with self._lock:
            remaining = self._settings.faults.stt_abort_streams
            if remaining < 0:
                return True
            if remaining == 0:
                return False
            faults = dataclasses.replace(self._settings.faults, stt_abort_streams=remaining - 1)
            self._settings = dataclasses.replace(self._settings, faults=faults)
            return True

    def count(self, name: str, delta: int = 1) -> None:
        with self._lock:
            self._counts[name] += delta

    def record_chat(self, body: Any) -> None:
        with self._lock:
            self._counts["chat_calls"] += 1
            self._last_chat_request = body

    def stats(self) -> dict[str, Any]:
        """A copy of the counters plus `last_chat_request` (parsed JSON or None)."""
        with self._lock:
            return {**self._counts, "last_chat_request": self._last_chat_request}
