"""agentd's configuration: one frozen value object, loaded once.

Theory of operation
-------------------
``load_config`` reads a TOML file (default: the repo's ``etc/agentd.toml``),
layers environment overrides on top, and validates the result into a frozen
``Config``.  Nothing else in agentd reads ``os.environ``.

* Defaults live in ONE place, with each key's constraints: the dataclasses of
  ``agentd.config_schema``, from which the keys and checks here derive.  The
  TOML file documents every key and repeats its default; a test keeps them equal.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentd.config_schema import (
    RESERVED_TOOL_NAMES, SECTIONS, AudioConfig, Business, BusinessTool, ConfigValues, LlmConfig, OpsConfig, Rule,
    ServerConfig, Spec, SpecConfig, SttConfig, TelemetryConfig, TtsConfig, TurnConfig, VadConfig,
)
from agentd.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_PATH", "ENV_ALIASES", "ENV_PREFIX", "RESERVED_TOOL_NAMES", "AudioConfig", "Business",
    "BusinessTool", "Config", "LlmConfig", "OpsConfig", "Rule", "ServerConfig", "SpecConfig", "SttConfig",
    "TelemetryConfig", "TtsConfig", "TurnConfig", "VadConfig", "config_summary", "config_tree", "load_config",
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


# --- the Config agentd uses ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Config(ConfigValues):
    """The whole configuration.  Build it with `load_config`; derive variants with `with_overrides`.

    Its keys and defaults are ConfigValues' (agentd.config_schema); it adds what needs the loader.
    """

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


# --- introspection of the schema's dataclasses ---------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Key:
    kind: str          # bool | int | float | str | strs | rules | tools | table | object
    optional: bool     # None allowed (meaning: unset)
    spec: Spec
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
        out[f.name] = _Key(kind, type(None) in args, f.metadata.get("spec", Spec()), required)
    return out


_SECTION_KEYS = {name: _keys(cls) for name, cls in SECTIONS.items()}
_TOP_KEYS = _keys(Config, skip=(*SECTIONS, "businesses"))  # keys outside any section: default_business
_BUSINESS_KEYS = _keys(Business, skip=("name",))
_BUSINESS_NAME_KEY = _keys(Business)["name"]  # the name of its [businesses.NAME] table
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
                self.value(f"businesses.{name}", name, _BUSINESS_NAME_KEY)
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
        if name not in SECTIONS and name not in _TOP_KEYS and name != "businesses":
            check.note(name, "unknown section (known: " + ", ".join([*SECTIONS, "businesses"]) + ")")
    sections = {name: cls(**(check.table(name, raw.get(name, {}), _SECTION_KEYS[name]) or {}))
                for name, cls in SECTIONS.items()}
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
    if isinstance(value, ConfigValues):
        tree = {name: _to_tree(getattr(value, name)) for name in (*SECTIONS, "default_business")}
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
