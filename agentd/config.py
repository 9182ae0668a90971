"""agentd's configuration: one frozen value object, loaded once.

Theory of operation
-------------------
``load_config`` reads a TOML file (default: the repo's ``etc/agentd.toml``),
layers environment overrides on top, and validates the result into a frozen
``Config``.  Nothing else in agentd reads ``os.environ``.

* Defaults live in ONE place: the dataclass defaults below.  The TOML file
  documents every key and repeats its default; a test keeps the two equal.
* Every key carries its unit in its name (``_ms``, ``_s``, ``_frames``).
* Validation happens here, at load, and every ``ConfigError`` names the full
  key (``stt.batch_ms: expected int ≥ 10, got -5``), plus the environment
  variable when the value came from one.
* Secrets never live in the file: keys that look like secrets are refused.
  The LLM key is read by the adapter from the variable named by
  ``llm.api_key_env`` (``Config.llm_api_key()``), the Twilio auth token and
  the per-call token secret likewise (``Config.twilio_auth_token()``,
  ``Config.call_token_secret()``); Google uses ``GOOGLE_APPLICATION_CREDENTIALS``.
* ``Config.with_overrides`` turns a Config back into its TOML-shaped tree,
  changes a few dotted keys and re-runs the very same validation.
"""

import dataclasses
import difflib
import math
import os
import re
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentd.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_PATH", "ENV_ALIASES", "ENV_PREFIX", "RESERVED_TOOL_NAMES", "AudioConfig", "Business",
    "BusinessTool", "Config", "LlmConfig", "OpsConfig", "Rule", "ServerConfig", "SttConfig", "TelemetryConfig",
    "TtsConfig", "TurnConfig", "VadConfig", "config_summary", "config_tree", "load_config",
]

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "etc" / "agentd.toml"

# The deployment's historical variable names; each maps to one dotted key.
ENV_ALIASES: Mapping[str, str] = types.MappingProxyType({
    "ENABLE_STREAMING_STT": "stt.streaming_enabled",
    "STT_BATCH_MS": "stt.batch_ms",
    "STT_PARTIAL_DEBOUNCE_MS": "stt.partial_debounce_ms",
    "STT_TIMEOUT_MS": "stt.final_timeout_ms",
    "VAD_HANGOVER_MS": "vad.hangover_ms",
    "MIN_UTT_SEC": "turn.min_utt_s",
    "REPLY_REFRACTORY_MS": "turn.refractory_ms",
    "GCP_STT_LANGUAGE": "stt.language",
    "GCP_STT_MODEL": "stt.model",
    "GOOGLE_CLOUD_SPEECH_ENDPOINT": "stt.endpoint",
})
# Generic form: AGENTD__SECTION__KEY (or AGENTD__DEFAULT_BUSINESS); applied after the aliases.
ENV_PREFIX = "AGENTD__"

_SECRET_NAME = re.compile(r"api_?key|token|secret|passw(?:or)?d", re.IGNORECASE)
_ENV_TRUE, _ENV_FALSE = ("1", "true", "yes"), ("0", "false", "no")


# --- field constraints --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class _Spec:
    """Constraints on one key.  Strings and lists must be non-empty unless allow_empty."""

    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    pattern: str = ""       # full-match regex
    like: str = ""          # how to describe the pattern in an error
    allow_empty: bool = False
    key_pattern: str = ""   # tables of strings: what each key must fullmatch


_PLAIN = _Spec()
_MS = _Spec(lo=0)
_TIMEOUT_MS = _Spec(lo=1)
_SECONDS = _Spec(lo=0)
_PORT_1_65535 = r"(?:[1-9]\d{0,3}|[1-5]\d{4}|6[0-4]\d{3}|65[0-4]\d{2}|655[0-2]\d|6553[0-5])"
_ENDPOINT = _Spec(pattern=r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):" + _PORT_1_65535,
                  like="host:port, e.g. eu-speech.googleapis.com:443")
_LANGUAGE = _Spec(pattern=r"[a-z]{2,3}-[A-Z]{2}", like="xx-YY, e.g. he-IL")
_NAME = _Spec(pattern=r"[A-Za-z0-9][A-Za-z0-9_.-]*", like="a name of letters, digits, _ . -")
_E164 = r"\+[1-9]\d{6,14}"
_URL_PATH = r"/[^\s?#]*"
# Business tool URLs: https, or plain http to the loopback interface only (a tool served on
# the same machine, and the tests); any other http:// would send call data in clear text.
_TOOL_URL = _Spec(pattern=r"https://[^\s/?#]+(?:[/?][^\s#]*)?|http://(?:127\.0\.0\.1|localhost|\[::1\])"
                          r"(?::\d{1,5})?(?:[/?][^\s#]*)?",
                  like="https://host/path (http:// only to 127.0.0.1, localhost or [::1])")
# OpenAI's rule for function names.
_TOOL_NAME = _Spec(pattern=r"[A-Za-z0-9_-]{1,64}", like="1-64 letters, digits, _ or -")
RESERVED_TOOL_NAMES = frozenset({"end_call", "transfer_call"})  # the agent's own tools
_DTMF_ACTION = r"end_call|transfer_call:[A-Za-z0-9][A-Za-z0-9_.-]*"


def _opt(default: Any, spec: _Spec = _PLAIN, **constraints: Any) -> Any:
    """A dataclass field with a default and its constraints (from `spec`, adjusted by keywords)."""
    return field(default=default, metadata={"spec": dataclasses.replace(spec, **constraints)})


def _table(**constraints: Any) -> Any:
    """A field holding a TOML table of strings (read-only; empty by default) and its constraints."""
    return field(default_factory=lambda: types.MappingProxyType({}),
                 metadata={"spec": _Spec(allow_empty=True, **constraints)})


# --- the value object ---------------------------------------------------------------------------

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

    name: str
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


_SECTIONS: Mapping[str, type] = types.MappingProxyType({
    "server": ServerConfig, "audio": AudioConfig, "vad": VadConfig, "turn": TurnConfig,
    "stt": SttConfig, "tts": TtsConfig, "llm": LlmConfig, "spec": SpecConfig,
    "ops": OpsConfig, "telemetry": TelemetryConfig,
})


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole configuration.  Build it with `load_config`; derive variants with `with_overrides`."""

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
    default_business: str = "default"

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

    def with_overrides(self, **overrides: Any) -> "Config":
        """A new, fully validated Config with dotted keys replaced.

        ``cfg.with_overrides(**{"stt.endpoint": "127.0.0.1:5005", "stt.tls": False})``.
        Any dotted path into the TOML tree works (``businesses.acme.greeting``); None
        removes the key, i.e. restores its default.  Raises ConfigError like load_config.
        """
        raw = _to_tree(self)
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        return _build(raw, {})


# --- introspection of the dataclasses above ------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Key:
    kind: str          # bool | int | float | str | strs | rules | tools | table | object
    optional: bool     # None allowed (meaning: unset)
    spec: _Spec
    required: bool


_KINDS = {bool: "bool", int: "int", float: "float", str: "str", tuple[str, ...]: "strs",
          tuple[Rule, ...]: "rules", tuple[BusinessTool, ...]: "tools", Mapping[str, str]: "table",
          Mapping[str, Any]: "object"}
_KIND_NAMES = {"bool": "bool", "int": "int", "float": "number", "str": "string", "strs": "list of strings",
               "table": "table of strings", "object": "table"}


def _keys(cls: type, skip: tuple[str, ...] = ()) -> dict[str, _Key]:
    """The TOML keys a dataclass accepts, derived from its fields."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        args = f.type.__args__ if isinstance(f.type, types.UnionType) else (f.type,)
        kind = _KINDS[next(a for a in args if a is not type(None))]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out[f.name] = _Key(kind, type(None) in args, f.metadata.get("spec", _PLAIN), required)
    return out


_SECTION_KEYS = {name: _keys(cls) for name, cls in _SECTIONS.items()}
_TOP_KEYS = {"default_business": _Key("str", False, _NAME, False)}
_BUSINESS_KEYS = _keys(Business, skip=("name",))
_RULE_KEYS = _keys(Rule)
_TOOL_KEYS = _keys(BusinessTool)
_KNOWN_NAMES = frozenset().union(*_SECTION_KEYS.values(), _TOP_KEYS, _BUSINESS_KEYS, _RULE_KEYS, _TOOL_KEYS)


def _describe(key: _Key) -> str:
    """What a valid value looks like, for error messages: 'int ≥ 10', 'one of a, b'."""
    spec, name = key.spec, _KIND_NAMES[key.kind]
    if spec.choices:
        text = "one of " + ", ".join(spec.choices)
    elif spec.like:
        text = f"{name} like {spec.like}"
    elif spec.lo is not None and spec.hi is not None:
        text = f"{name} in {spec.lo}..{spec.hi}"
    elif spec.lo is not None:
        text = f"{name} ≥ {spec.lo}"
    elif key.kind in ("str", "strs") and not spec.allow_empty:
        text = f"non-empty {name}"
    else:
        text = name
    return text + (" (or unset)" if key.optional else "")


def _type_ok(kind: str, value: Any) -> bool:
    if kind in ("int", "float") and isinstance(value, bool):
        return False  # bool is an int subclass; `port = true` is a mistake, not 1
    if kind == "float":
        return isinstance(value, int | float) and math.isfinite(value)
    if kind == "strs":
        return isinstance(value, list | tuple) and all(isinstance(item, str) and item for item in value)
    if kind == "table":
        return isinstance(value, Mapping) and all(isinstance(v, str) for v in value.values())
    if kind == "object":
        return isinstance(value, Mapping)
    return isinstance(value, {"bool": bool, "int": int, "str": str}[kind])


def _in_spec(key: _Key, value: Any) -> bool:
    spec = key.spec
    if key.kind in ("str", "strs", "table") and len(value) == 0:
        return spec.allow_empty
    if key.kind == "strs" and spec.pattern:
        return all(re.fullmatch(spec.pattern, item) for item in value)
    if key.kind == "table":
        return all(re.fullmatch(spec.key_pattern, k) and re.fullmatch(spec.pattern, v) for k, v in value.items())
    if key.kind == "object":
        return True
    return ((spec.lo is None or value >= spec.lo) and (spec.hi is None or value <= spec.hi)
            and (not spec.choices or value in spec.choices)
            and (not spec.pattern or re.fullmatch(spec.pattern, value) is not None))


# --- validation ----------------------------------------------------------------------------------

class _Validator:
    """Turns the raw TOML tree into a Config; every failure names its dotted key.

    Problems are collected, not raised one at a time, so an operator sees every
    mistake in one run: an invalid value is reported and left at its default
    while the rest of the tree is still checked.
    """

    def __init__(self, origins: Mapping[str, str]) -> None:
        self._origins = origins  # dotted key -> environment variable it came from
        self.errors: list[str] = []

    def fail(self, key: str, text: str) -> ConfigError:
        source = self._origins.get(key)
        return ConfigError(f"{key} (from env {source}): {text}" if source else f"{key}: {text}")

    def note(self, key: str, text: str) -> None:
        """Record one problem and carry on."""
        self.errors.append(str(self.fail(key, text)))

    def value(self, path: str, value: Any, key: _Key) -> Any:
        """Type-check and range-check one value; ints are accepted for floats, bools never for ints."""
        if key.kind in ("rules", "tools"):
            cls, keys = (Rule, _RULE_KEYS) if key.kind == "rules" else (BusinessTool, _TOOL_KEYS)
            return self.array(path, value, cls, keys)
        if not (_type_ok(key.kind, value) and _in_spec(key, value)):
            raise self.fail(path, f"expected {_describe(key)}, got {value!r}")
        if key.kind == "float":
            return float(value)
        if key.kind in ("table", "object"):
            return types.MappingProxyType(dict(value))
        return tuple(value) if key.kind == "strs" else value

    def table(self, path: str, table: Any, keys: Mapping[str, _Key]) -> dict[str, Any] | None:
        """The valid values of one TOML table, problems noted.

        None when the table cannot become its dataclass (not a table, or a required key missing or invalid).
        """
        if not isinstance(table, dict):
            self.note(path, f"expected a table, got {table!r}")
            return None
        out, complete = {}, True
        for name, raw in table.items():
            if name not in keys:
                if _SECRET_NAME.search(name):
                    continue  # _reject_secrets has said what to do with it
                close = difflib.get_close_matches(name, list(keys), n=1)
                hint = f"did you mean {close[0]}?" if close else "known: " + ", ".join(keys)
                self.note(f"{path}.{name}", f"unknown key ({hint})")
                continue
            try:
                out[name] = self.value(f"{path}.{name}", raw, keys[name])
            except ConfigError as exc:
                self.errors.append(str(exc))
                complete = complete and not keys[name].required
        for name, key in keys.items():
            if key.required and name not in table:
                self.note(f"{path}.{name}", "missing")
                complete = False
        return out if complete else None

    def array(self, path: str, value: Any, cls: type, keys: Mapping[str, _Key]) -> tuple[Any, ...]:
        """An array of tables ([[path]]), each validated into `cls`."""
        if not isinstance(value, list):
            raise self.fail(path, f"expected an array of tables ([[{path}]]), got {value!r}")
        tables = [self.table(f"{path}[{i}]", item, keys) for i, item in enumerate(value)]
        return tuple(cls(**t) for t in tables if t is not None)

    def businesses(self, raw: Any, language: str) -> dict[str, Business]:
        if not isinstance(raw, dict) or not raw:
            self.note("businesses", "at least one [businesses.NAME] table is required")
            return {}
        out = {}
        for name, table in raw.items():
            try:
                self.value(f"businesses.{name}", name, _Key("str", False, _NAME, True))
            except ConfigError as exc:
                self.errors.append(str(exc))
            if isinstance(table, dict):
                table = {"language": language, **table}
            values = self.table(f"businesses.{name}", table, _BUSINESS_KEYS)
            if values is not None:
                out[name] = Business(name=name, **values)
                self.business_checks(out[name])
        self.unique_numbers(out)
        return out

    def business_checks(self, business: Business) -> None:
        """What one business's keys must agree on: tool names, schemas, DTMF transfer targets."""
        path = f"businesses.{business.name}"
        for i, rule in enumerate(business.rules):
            if not rule.reply and not rule.tool:
                self.note(f"{path}.rules[{i}].reply", "missing (a rule needs a reply, a tool, or both)")
        seen: set[str] = set()
        for i, tool in enumerate(business.tools):
            if tool.name in RESERVED_TOOL_NAMES or tool.name in seen:
                why = "is the agent's own tool" if tool.name in RESERVED_TOOL_NAMES else "is declared twice"
                self.note(f"{path}.tools[{i}].name", f"{tool.name!r} {why}")
            seen.add(tool.name)
            if tool.parameters.get("type") != "object" or not _is_json(tool.parameters):
                self.note(f"{path}.tools[{i}].parameters", 'expected a JSON schema with type = "object" '
                          "(strings, numbers, booleans, arrays and tables only)")
        for digit, action in business.dtmf.items():
            target = action.partition(":")[2]
            if target and target not in business.transfer:
                self.note(f"{path}.dtmf.{digit}", f"{target!r} is not in [{path}.transfer] "
                          f"(have: {', '.join(sorted(business.transfer)) or 'none'})")

    def unique_numbers(self, businesses: Mapping[str, Business]) -> None:
        """A called number picks one business: the same number in two is a mistake."""
        owner: dict[str, str] = {}
        for business in businesses.values():
            for number in business.numbers:
                if number in owner:
                    self.note(f"businesses.{business.name}.numbers",
                              f"{number} is already a number of businesses.{owner[number]}")
                owner[number] = business.name

    def cross_checks(self, sections: Mapping[str, Any]) -> None:
        """Constraints that involve two keys; the error names the one to change."""
        pairs = [("audio.tx_lead_frames", "audio.tx_queue_frames"),
                 ("turn.breath_min_ms", "turn.breath_max_ms"),
                 ("turn.min_silence_short_s", "turn.min_silence_long_s")]
        for small, big in pairs:
            a, b = (getattr(sections[k.split(".")[0]], k.split(".")[1]) for k in (small, big))
            if a > b:
                self.note(small, f"must be ≤ {big} ({b}), got {a}")


def _raise_all(errors: list[str]) -> None:
    """One ConfigError listing every problem (its text is the lone problem when there is one)."""
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"{len(errors)} problems:\n  " + "\n  ".join(errors))


def _build(raw: Mapping[str, Any], origins: Mapping[str, str], errors: tuple[str, ...] = ()) -> Config:
    """Validate the merged raw tree into a Config; ConfigError lists every problem (and `errors`)."""
    check = _Validator(origins)
    check.errors += errors
    _reject_secrets(raw, "", check.errors)
    for name in raw:
        if name not in _SECTIONS and name not in _TOP_KEYS and name != "businesses":
            check.note(name, "unknown section (known: " + ", ".join([*_SECTIONS, "businesses"]) + ")")
    sections = {name: cls(**(check.table(name, raw.get(name, {}), _SECTION_KEYS[name]) or {}))
                for name, cls in _SECTIONS.items()}
    check.cross_checks(sections)
    businesses = check.businesses(raw.get("businesses"), sections["stt"].language)
    top = {}
    for name, key in _TOP_KEYS.items():
        try:
            if name in raw:
                top[name] = check.value(name, raw[name], key)
        except ConfigError as exc:
            check.errors.append(str(exc))
    default = top.get("default_business", "default")
    known = businesses.keys() | (raw.get("businesses") or {}).keys()
    if businesses and default not in known:
        check.note("default_business", f"{default!r} is not a configured business (have: {', '.join(sorted(known))})")
    _raise_all(check.errors)
    return Config(**sections, **top, businesses=types.MappingProxyType(businesses))


def _is_json(value: Any) -> bool:
    """Whether `value` (from TOML) is plain JSON: TOML's dates and times are not."""
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_is_json(item) for item in value)
    return value is None or isinstance(value, str | int | float | bool)


def _reject_secrets(node: Any, path: str, errors: list[str]) -> None:
    """Note secret-looking keys anywhere in the tree (checked before 'unknown key' for a better hint)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for name, child in items:
        here = f"{path}[{name}]" if isinstance(name, int) else f"{path}.{name}".lstrip(".")
        if isinstance(name, str) and _SECRET_NAME.search(name) and name not in _KNOWN_NAMES:
            errors.append(
                f"{here}: looks like a secret; secrets never go in the config file. Put them in the "
                "environment (/etc/agentd/agentd.env: OPENAI_API_KEY, TWILIO_AUTH_TOKEN) or a credential "
                "file (GOOGLE_APPLICATION_CREDENTIALS); llm.api_key_env names the LLM key's variable")
        if name != "parameters":  # a tool's JSON schema names what the model sends ("pin"), not our secrets
            _reject_secrets(child, here, errors)


def _to_tree(value: Any) -> Any:
    """The TOML-shaped tree of a Config (or part of one); None values are left out, as in TOML."""
    if isinstance(value, Config):
        tree = {name: _to_tree(getattr(value, name)) for name in (*_SECTIONS, "default_business")}
        return {**tree, "businesses": {name: _to_tree(b) for name, b in value.businesses.items()}}
    if dataclasses.is_dataclass(value):
        skip = ("name",) if isinstance(value, Business) else ()  # a business's name is its table's name
        return {f.name: _to_tree(v) for f in dataclasses.fields(value)
                if f.name not in skip and (v := getattr(value, f.name)) is not None}
    if isinstance(value, Mapping):
        return {k: _to_tree(v) for k, v in value.items()}
    return [_to_tree(item) for item in value] if isinstance(value, tuple) else value


def config_tree(config: Config) -> dict[str, Any]:
    """The Config as its TOML-shaped tree (JSON-ready): what `agentd check-config` prints.

    It holds no secret: secrets never enter a Config, only the names of their variables.
    """
    return _to_tree(config)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set (or, for None, remove) `a.b.c` in a nested dict, creating tables on the way."""
    *parents, last = dotted.split(".")
    if not last or not all(parents):
        raise ConfigError(f"{dotted!r}: not a dotted key like 'stt.endpoint'")
    node = raw
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {'.'.join(parents[:i + 1])} is not a table")
    if value is None:
        node.pop(last, None)
    else:
        node[last] = list(value) if isinstance(value, tuple) else value


# --- environment ---------------------------------------------------------------------------------

def _env_key(var: str) -> str:
    """The dotted key an AGENTD__SECTION__KEY variable names, or ConfigError naming the variable."""
    parts = var[len(ENV_PREFIX):].lower().split("__")
    dotted = ".".join(parts)
    if len(parts) == 1 and dotted in _TOP_KEYS:
        return dotted
    if len(parts) != 2 or parts[0] not in _SECTION_KEYS:
        raise ConfigError(f"{var}: expected {ENV_PREFIX}SECTION__KEY with SECTION one of "
                          f"{', '.join(s.upper() for s in _SECTION_KEYS)} (businesses live only in the file)")
    if _SECRET_NAME.search(parts[1]) and parts[1] not in _KNOWN_NAMES:
        raise ConfigError(f"{var}: secrets are not config; the LLM key is read from the variable "
                          "named by llm.api_key_env")
    if parts[1] not in _SECTION_KEYS[parts[0]]:
        raise ConfigError(f"{var}: unknown key {dotted}")
    return dotted


def _parse_env(var: str, dotted: str, text: str) -> Any:
    """Parse an environment string as the key's type; None means 'unset' (optional keys only)."""
    section, _, name = dotted.rpartition(".")
    key = _SECTION_KEYS[section][name] if section else _TOP_KEYS[name]
    text = text.strip()
    try:
        if key.optional and text.lower() in ("", "none"):
            return None
        if key.kind == "bool":
            if text.lower() not in _ENV_TRUE + _ENV_FALSE:
                raise ValueError(text)
            return text.lower() in _ENV_TRUE
        return {"int": int, "float": float}.get(key.kind, str)(text)
    except ValueError:
        hint = "1/0/true/false/yes/no" if key.kind == "bool" else _describe(key)
        raise ConfigError(f"{dotted} (from env {var}): expected {hint}, got {text!r}") from None


def _env_overrides(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """(dotted key -> typed value, dotted key -> variable name, problems) from the environment."""
    found, values, errors = [(var, dotted) for var, dotted in ENV_ALIASES.items() if var in env], {}, []
    for var in sorted(env):
        if var.startswith(ENV_PREFIX):
            try:
                found.append((var, _env_key(var)))
            except ConfigError as exc:
                errors.append(str(exc))
    for var, dotted in found:
        try:
            values[dotted] = _parse_env(var, dotted, env[var])
        except ConfigError as exc:
            errors.append(str(exc))
    return values, {dotted: var for var, dotted in found}, errors


# --- entry points --------------------------------------------------------------------------------

def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (None: the repo's etc/agentd.toml), apply env overrides, validate.

    `env` None means os.environ.  Raises ConfigError naming the file, key or variable at fault.
    """
    file = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        with open(file, "rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read config ({exc.strerror or exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: invalid TOML: {exc}") from exc
    values, origins, errors = _env_overrides(os.environ if env is None else env)
    for dotted, value in values.items():
        _set_dotted(raw, dotted, value)
    return _build(raw, origins, tuple(errors))


def config_summary(config: Config) -> str:
    """A few log-friendly lines describing the config: no secrets, no prompts."""
    s, st, t, llm, tu = config.server, config.stt, config.tts, config.llm, config.turn
    on = {True: "on", False: "off"}
    businesses = ", ".join(
        f"{b.name}{'*' if b.name == config.default_business else ''}({b.language} {b.voice})"
        for b in config.businesses.values())
    return "\n".join([
        f"server {s.host}:{s.port}{s.path} max_calls={s.max_calls} log={s.log_level}/{s.log_format} "
        f"drain={s.drain_timeout_s:g}s telemetry={s.telemetry_dir or 'off'} "
        f"(keep {config.telemetry.keep_days or 'all'} days) ops={config.ops.listen or 'off'}",
        f"stt {st.endpoint} tls={on[st.tls]} lang={st.language} model={st.model} "
        f"streaming={on[st.streaming_enabled]} batch={st.batch_ms}ms final_timeout={st.final_timeout_ms}ms",
        f"tts {t.endpoint} tls={on[t.tls]} timeout={t.timeout_ms}ms rate={t.speaking_rate}",
        f"llm {llm.base_url} model={llm.model} key_env={llm.api_key_env or '-'} "
        f"{llm.max_tokens_param}={llm.max_tokens} ttft_timeout={llm.first_token_timeout_ms}ms",
        f"turn min_utt={tu.min_utt_s}s silence={tu.min_silence_short_s}/{tu.min_silence_long_s}s "
        f"refractory={tu.refractory_ms}ms barge_in={on[tu.barge_in_enabled]} vad={config.vad.aggressiveness}",
        f"businesses {businesses}",
    ])
