"""The shape of agentd's configuration: every key, its default and its constraints.

This module is the one place a default lives.  Each ``[section]`` of
``etc/agentd.toml`` is a frozen dataclass below (``[server]`` is
``ServerConfig``, ...), each key one of its fields, a ``[businesses.NAME]``
table is a ``Business``, and the whole tree is ``ConfigValues``.
``agentd.config`` reads TOML and the environment into these classes and
derives the keys, their types and their checks from the fields, so a key
declared here is read, checked and (in a section) overridable from the
environment with no change there.  This module does no I/O and imports
nothing of agentd's.

Declaring a key
---------------
* The field's type is the key's TOML kind: ``bool``, ``int``, ``float``,
  ``str``, ``tuple[str, ...]`` (an array of strings), ``Mapping[str, str]``
  (a table of strings), ``Mapping[str, Any]`` (a free-form table, kept
  read-only), a tuple of ``Rule`` or ``BusinessTool`` (an array of tables), or
  ``X | None`` for a key that may be left unset.
* Its default and constraints come from ``_opt(default, SPEC, **tweaks)``
  (``port: int = _opt(8080, lo=0, hi=65535)``), or ``_table(...)`` for a table
  of strings.  A bare default constrains only the type; a field without one
  is a required key; strings and lists must be non-empty unless
  ``allow_empty``.
* The name carries the unit (``_ms``, ``_s``, ``_frames``), and the same key,
  documented with the same default, goes into ``etc/agentd.toml``;
  ``tests/test_config.py`` keeps the two equal.  A new section is a new
  dataclass, a field of ``ConfigValues`` and an entry in ``SECTIONS``.
"""

import dataclasses
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "RESERVED_TOOL_NAMES", "SECTIONS", "AudioConfig", "Business", "BusinessTool", "ConfigValues", "LlmConfig",
    "OpsConfig", "Rule", "ServerConfig", "Spec", "SpecConfig", "SttConfig", "TelemetryConfig", "TtsConfig",
    "TurnConfig", "VadConfig",
]


# --- field constraints ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Spec:
    """Constraints on one key.  Strings and lists must be non-empty unless allow_empty."""

    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    pattern: str = ""       # full-match regex
    like: str = ""          # how to describe the pattern in an error
    allow_empty: bool = False
    key_pattern: str = ""   # tables of strings: what each key must fullmatch


_PLAIN = Spec()
_MS = Spec(lo=0)
_TIMEOUT_MS = Spec(lo=1)
_SECONDS = Spec(lo=0)
_PORT_1_65535 = r"(?:[1-9]\d{0,3}|[1-5]\d{4}|6[0-4]\d{3}|65[0-4]\d{2}|655[0-2]\d|6553[0-5])"
_ENDPOINT = Spec(pattern=r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):" + _PORT_1_65535,
                 like="host:port, e.g. eu-speech.googleapis.com:443")
_LANGUAGE = Spec(pattern=r"[a-z]{2,3}-[A-Z]{2}", like="xx-YY, e.g. he-IL")
_NAME = Spec(pattern=r"[A-Za-z0-9][A-Za-z0-9_.-]*", like="a name of letters, digits, _ . -")
_E164 = r"\+[1-9]\d{6,14}"
_URL_PATH = r"/[^\s?#]*"
# Business tool URLs: https, or plain http to the loopback interface only (a tool served on
# the same machine, and the tests); any other http:// would send call data in clear text.
_TOOL_URL = Spec(pattern=r"https://[^\s/?#]+(?:[/?][^\s#]*)?|http://(?:127\.0\.0\.1|localhost|\[::1\])"
                         r"(?::\d{1,5})?(?:[/?][^\s#]*)?",
                 like="https://host/path (http:// only to 127.0.0.1, localhost or [::1])")
# OpenAI's rule for function names.
_TOOL_NAME = Spec(pattern=r"[A-Za-z0-9_-]{1,64}", like="1-64 letters, digits, _ or -")
RESERVED_TOOL_NAMES = frozenset({"end_call", "transfer_call"})  # the agent's own tools
_DTMF_ACTION = r"end_call|transfer_call:[A-Za-z0-9][A-Za-z0-9_.-]*"


def _opt(default: Any, spec: Spec = _PLAIN, **constraints: Any) -> Any:
    """A dataclass field with a default and its constraints (from `spec`, adjusted by keywords)."""
    return field(default=default, metadata={"spec": dataclasses.replace(spec, **constraints)})


def _table(**constraints: Any) -> Any:
    """A field holding a TOML table of strings (read-only; empty by default) and its constraints."""
    return field(default_factory=lambda: types.MappingProxyType({}),
                 metadata={"spec": Spec(allow_empty=True, **constraints)})


# --- the value object ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """[server]: the WebSocket endpoint Twilio connects to, and daemon-wide knobs."""

    host: str = "0.0.0.0"
    port: int = _opt(8080, lo=0, hi=65535)  # 0 = any free port (tests)
    path: str = _opt("/media", pattern=_URL_PATH, like="/path")
    # Twilio's voice webhook (TwiML answer) and the <Connect action> it requests when the stream ends.
    voice_path: str = _opt("/twilio/voice", pattern=_URL_PATH, like="/path")
    after_path: str = _opt("/twilio/after", pattern=_URL_PATH, like="/path")
    max_message_bytes: int = _opt(65536, lo=1024)
    max_calls: int = _opt(100, lo=1)
    # A socket must send `start` this long after it connected (Twilio sends it at once).
    start_timeout_ms: int = _opt(2000, _TIMEOUT_MS)
    # Connections that have not sent `start` yet (or are mid-request), in all and per source
    # address; they never count against max_calls.
    max_pending: int = _opt(64, lo=1)
    max_pending_per_ip: int = _opt(16, lo=1)
    max_call_duration_s: float = _opt(3600.0, lo=1)
    # No inbound message for this long ends the call: Twilio streams media every 20 ms,
    # so the peer is gone (a half-open connection that never closes).
    media_timeout_ms: int = _opt(5000, _TIMEOUT_MS)
    # Twilio request validation: the public wss:// URL exactly as in the TwiML ("" = no check).
    public_url: str = _opt("", pattern=r"wss?://[^\s?#]+", like="wss://host/path", allow_empty=True)
    # Name of the env variable holding the Twilio auth token used to check x-twilio-signature.
    auth_token_env: str = _opt("TWILIO_AUTH_TOKEN", pattern=r"[A-Za-z_][A-Za-z0-9_]*",
                               like="an environment variable name")
    # Per-call <Parameter> carrying HMAC-SHA256(secret, callSid) ("" = no per-call token).
    call_token_param: str = _opt("", allow_empty=True)
    call_token_secret_env: str = _opt("AGENTD_CALL_TOKEN_SECRET", pattern=r"[A-Za-z_][A-Za-z0-9_]*",
                                      like="an environment variable name")
    stats_interval_s: float = _opt(1.0, _SECONDS)  # 0 = no per-call stats line
    telemetry_dir: str = _opt("", allow_empty=True)  # "" = telemetry off
    log_level: str = _opt("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
    log_format: str = _opt("text", choices=("text", "json"))  # json: one object per line
    # On SIGTERM/SIGINT calls go on this long; then each still up hears its goodbye and ends.
    drain_timeout_s: float = _opt(300.0, _SECONDS)
    # SO_REUSEPORT on the Twilio listener: N processes share host:port, the kernel spreads
    # connections; a draining process closes its listener so its siblings take the new calls.
    reuse_port: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class OpsConfig:
    """[ops]: the operator's HTTP listener (/healthz, /readyz, /metrics, the status page)."""

    # host:port; port 0 = any free port (tests); "" = no ops listener.
    listen: str = _opt("127.0.0.1:9090", allow_empty=True, like="host:port, e.g. 127.0.0.1:9090",
                       pattern=r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):(?:0|" + _PORT_1_65535 + ")")


@dataclass(frozen=True, slots=True, kw_only=True)
class TelemetryConfig:
    """[telemetry]: retention of the JSONL files in server.telemetry_dir."""

    keep_days: int = _opt(30, lo=0)  # files older than this many UTC days are deleted; 0 = keep all


@dataclass(frozen=True, slots=True, kw_only=True)
class AudioConfig:
    """[audio]: the outbound (TX) frame queue, 20 ms frames."""

    tx_queue_frames: int = _opt(120, lo=1)
    tx_lead_frames: int = _opt(5, lo=0)
    tx_frames_per_message: int = _opt(2, lo=1, hi=10)  # paced audio per media message, in 20 ms frames
    # Marks not echoed this long after their audio should have played are given up on.
    mark_timeout_ms: int = _opt(3000, _TIMEOUT_MS)


@dataclass(frozen=True, slots=True, kw_only=True)
class VadConfig:
    """[vad]: WebRTC VAD on the caller's audio."""

    aggressiveness: int = _opt(2, lo=0, hi=3)
    speech_start_ms: int = _opt(60, _MS)
    hangover_ms: int = _opt(220, _MS)
    frame_ms: int = _opt(20, lo=10, hi=30)  # webrtcvad takes 10, 20 or 30 (VadSettings checks which)
    energy_floor_dbfs: float = _opt(-55.0, lo=-120.0, hi=-0.1)


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnConfig:
    """[turn]: end-of-turn, breath and barge-in timing."""

    min_utt_s: float = _opt(0.6, _SECONDS)
    min_silence_short_s: float = _opt(0.5, _SECONDS)
    min_silence_long_s: float = _opt(1.8, _SECONDS)
    long_utterance_s: float = _opt(2.0, _SECONDS)
    refractory_ms: int = _opt(1100, _MS)
    breath_min_ms: int = _opt(50, _MS)
    breath_max_ms: int = _opt(120, _MS)
    hesitation_guard_ms: int = _opt(700, _MS)
    barge_in_enabled: bool = True
    barge_in_min_ms: int = _opt(300, _MS)
    barge_in_guard_ms: int = _opt(250, _MS)
    barge_in_requires_words: bool = True
    greeting_barge_in: bool = True
    early_finalize_enabled: bool = True
    strong_punct_min_chars: int = _opt(12, lo=1)
    strong_bare_min_chars: int = _opt(18, lo=1)
    strong_bare_silence_s: float = _opt(0.5, _SECONDS)
    dtmf_digit_timeout_ms: int = _opt(3000, _TIMEOUT_MS)
    idle_reprompt_s: float = _opt(8.0, lo=1)
    idle_max_reprompts: int = _opt(2, lo=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class SttConfig:
    """[stt]: Google Speech-to-Text v1 StreamingRecognize."""

    endpoint: str = _opt("eu-speech.googleapis.com:443", _ENDPOINT)
    tls: bool = True
    language: str = _opt("he-IL", _LANGUAGE)
    model: str = "default"
    use_enhanced: bool = False
    automatic_punctuation: bool = True
    streaming_enabled: bool = True
    batch_ms: int = _opt(60, lo=10)
    partial_debounce_ms: int = _opt(90, _MS)
    final_timeout_ms: int = _opt(320, _MS)
    open_attempts: int = _opt(3, lo=1)
    open_timeout_ms: int = _opt(3000, _TIMEOUT_MS)
    retry_after_ms: int = _opt(10000, _TIMEOUT_MS)
    fallback_timeout_ms: int = _opt(5000, _TIMEOUT_MS)
    rotate_after_s: float = _opt(240.0, lo=5, hi=300)


@dataclass(frozen=True, slots=True, kw_only=True)
class TtsConfig:
    """[tts]: Google Text-to-Speech v1."""

    endpoint: str = _opt("texttospeech.googleapis.com:443", _ENDPOINT)
    tls: bool = True
    timeout_ms: int = _opt(5000, _TIMEOUT_MS)
    speaking_rate: float = _opt(1.0, lo=0.25, hi=4.0)
    streaming: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class LlmConfig:
    """[llm]: an OpenAI-compatible chat completions endpoint (streamed)."""

    base_url: str = _opt("https://api.openai.com/v1", pattern=r"https?://[^\s/?#]+(?:/[^\s?#]*)?",
                         like="http(s)://host[/path]")
    model: str = "gpt-4o-mini"
    api_key_env: str = _opt("OPENAI_API_KEY", pattern=r"[A-Za-z_][A-Za-z0-9_]*", like="an environment "
                            "variable name", allow_empty=True)  # "" = send no key (localcloud)
    max_tokens_param: str = _opt("max_completion_tokens", choices=("max_tokens", "max_completion_tokens"))
    max_tokens: int = _opt(150, lo=1)
    temperature: float | None = _opt(None, lo=0.0, hi=2.0)  # unset = the server's default
    timeout_ms: int = _opt(10000, _TIMEOUT_MS)
    first_token_timeout_ms: int = _opt(4000, _TIMEOUT_MS)
    history_turns: int = _opt(12, lo=0)
    first_clause_min_chars: int = _opt(24, lo=0)
    filler_after_ms: int = _opt(1200, _MS)  # 0 = never
    stream_usage: bool = True  # ask for token usage at the end of each stream (stream_options)


@dataclass(frozen=True, slots=True, kw_only=True)
class SpecConfig:
    """[spec]: speculative replies started on a stable partial transcript."""

    enabled: bool = True
    min_chars: int = _opt(14, lo=1)
    stable_ms: int = _opt(250, _MS)
    wait_ms: int = _opt(400, _MS)
    synthesize_draft: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """A canned reply for localcloud's `rules` LLM engine; agentd itself never reads rules.

    `tool` makes the reply (text first, if any) end with a call of that tool,
    `arguments` its JSON text sent verbatim (bad JSON included, for the
    tests); `after_tool` is the answer once the tool's result comes back,
    `{result}` standing for the result's text.
    """

    keywords: tuple[str, ...]
    reply: str = _opt("", allow_empty=True)
    tool: str = _opt("", allow_empty=True)
    arguments: str = _opt("{}", allow_empty=True)
    after_tool: str = _opt("{result}", allow_empty=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class BusinessTool:
    """[[businesses.NAME.tools]]: an HTTP endpoint the model may call; agentd POSTs the arguments as JSON."""

    name: str = _opt(dataclasses.MISSING, _TOOL_NAME)
    description: str
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: types.MappingProxyType({"type": "object", "properties": {}}))
    url: str = _opt(dataclasses.MISSING, _TOOL_URL)
    timeout_ms: int = _opt(3000, _TIMEOUT_MS)


@dataclass(frozen=True, slots=True, kw_only=True)
class Business:
    """[businesses.NAME]: who the agent is on a call.  `language` defaults to stt.language."""

    name: str = _opt(dataclasses.MISSING, _NAME)  # the table's name: [businesses.NAME]
    language: str = _opt(dataclasses.MISSING, _LANGUAGE)  # required here; the loader fills in stt.language
    voice: str
    greeting: str
    system_prompt: str
    apology: str = _opt("", allow_empty=True)  # said when the LLM fails; "" = say nothing
    goodbye: str = _opt("", allow_empty=True)  # said when the agent ends the call; "" = say nothing
    fillers: tuple[str, ...] = _opt((), allow_empty=True)
    log_transcripts: bool = False
    rules: tuple[Rule, ...] = ()
    fallback_reply: str = _opt("", allow_empty=True)
    # Called numbers (E.164, the webhook's `To`) that reach this business.
    numbers: tuple[str, ...] = _opt((), pattern=_E164, like="E.164, e.g. +15551234567", allow_empty=True)
    # transfer_call targets: name -> E.164 number.
    transfer: Mapping[str, str] = _table(key_pattern=_NAME.pattern, pattern=_E164,
                                         like="name = \"+15551234567\" (E.164)")
    tools: tuple[BusinessTool, ...] = ()
    reprompt: str = _opt("", allow_empty=True)  # said to a silent caller; "" = never reprompt
    handoff: str = _opt("", allow_empty=True)  # said before a transfer; "" = say nothing
    # Single keypad digits the agent acts on at once: digit -> end_call | transfer_call:TARGET.
    dtmf: Mapping[str, str] = _table(key_pattern=r"[0-9*]", pattern=_DTMF_ACTION,  # "#" ends an entry
                                     like='"0" = "transfer_call:front_desk" or "end_call"')


SECTIONS: Mapping[str, type] = types.MappingProxyType({
    "server": ServerConfig, "audio": AudioConfig, "vad": VadConfig, "turn": TurnConfig,
    "stt": SttConfig, "tts": TtsConfig, "llm": LlmConfig, "spec": SpecConfig,
    "ops": OpsConfig, "telemetry": TelemetryConfig,
})


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigValues:
    """The whole configuration: its sections, its businesses, and lookups (which business, which secret).

    What agentd uses is its subclass `agentd.config.Config`, built by `load_config`: it adds
    `with_overrides`, which runs the loader's validation, so that this module imports nothing
    from the loader.
    """

    server: ServerConfig = field(default_factory=ServerConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    turn: TurnConfig = field(default_factory=TurnConfig)
    stt: SttConfig = field(default_factory=SttConfig)
    tts: TtsConfig = field(default_factory=TtsConfig)
    llm: LlmConfig = field(default_factory=LlmConfig)
    spec: SpecConfig = field(default_factory=SpecConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    businesses: Mapping[str, Business]
    default_business: str = _opt("default", _NAME)

    def business(self, name: str | None) -> Business:
        """The business called `name`, or the default business when `name` is None or unknown."""
        return self.businesses.get(name or "", self.businesses[self.default_business])

    def business_for_number(self, called: str | None) -> Business:
        """The business whose `numbers` include `called` (the webhook's `To`), else the default."""
        return next((b for b in self.businesses.values() if called and called in b.numbers),
                    self.businesses[self.default_business])

    def llm_api_key(self, env: Mapping[str, str] | None = None) -> str | None:
        """The LLM API key from the variable named by llm.api_key_env (env None: os.environ).

        None when llm.api_key_env is "" or the variable is unset or empty (e.g. localcloud).
        Read on demand, never stored, so the key appears in no repr or log of the Config.
        """
        name = self.llm.api_key_env
        return ((os.environ if env is None else env).get(name) or None) if name else None

    def twilio_auth_token(self, env: Mapping[str, str] | None = None) -> str | None:
        """The Twilio auth token from the variable named by server.auth_token_env (env None: os.environ).

        None when the variable is unset or empty. Read on demand, never stored (as llm_api_key).
        """
        return (os.environ if env is None else env).get(self.server.auth_token_env) or None

    def call_token_secret(self, env: Mapping[str, str] | None = None) -> str | None:
        """The per-call token secret from the variable named by server.call_token_secret_env.

        env None: os.environ. None when unset or empty. Read on demand, never stored.
        """
        return (os.environ if env is None else env).get(self.server.call_token_secret_env) or None

