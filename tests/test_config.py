"""agentd.config and agentd.config_schema: defaults, validation, environment overrides, secrets, with_overrides."""

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from agentd import config_schema
from agentd.config import (
    DEFAULT_CONFIG_PATH, ENV_ALIASES, AudioConfig, Config, LlmConfig, ServerConfig, SttConfig, TtsConfig,
    TurnConfig, VadConfig, config_summary, load_config,
)
from agentd.errors import ConfigError

SECTION_DEFAULTS = {"server": ServerConfig(), "audio": AudioConfig(), "vad": VadConfig(), "turn": TurnConfig(),
                    "stt": SttConfig(), "tts": TtsConfig(), "llm": LlmConfig()}

MINIMAL_BUSINESS = """
[businesses.default]
voice = "en-US-Standard-C"
greeting = "Hello."
system_prompt = "Be brief."
"""


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config(None, env={})


def load_text(tmp_path, text: str, env: dict[str, str] | None = None) -> Config:
    path = tmp_path / "agentd.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, env=env or {})


# --- the shipped file ------------------------------------------------------------------------------

def test_shipped_file_holds_exactly_the_built_in_defaults(config):
    for name, default in SECTION_DEFAULTS.items():
        assert getattr(config, name) == default, name
    assert config.default_business == "default"


def test_shipped_file_documents_every_key_with_a_comment():
    lines = DEFAULT_CONFIG_PATH.read_text(encoding="utf-8").splitlines()
    for section, default in SECTION_DEFAULTS.items():
        start = lines.index(f"[{section}]")
        body = lines[start + 1:]
        body = body[:next((i for i, line in enumerate(body) if line.startswith("[")), len(body))]
        for f in dataclasses.fields(default):
            at = next((i for i, line in enumerate(body) if re.match(rf"(# )?{f.name} = ", line)), None)
            assert at is not None, f"{section}.{f.name} is not documented"
            assert at > 0 and body[at - 1].startswith("#"), f"{section}.{f.name} has no comment above it"


def test_default_business_speaks_hebrew(config):
    biz = config.business("default")
    assert (biz.language, biz.voice) == ("he-IL", "he-IL-Standard-A")
    assert re.search("[\u0590-\u05ff]", biz.greeting) and re.search("[\u0590-\u05ff]", biz.system_prompt)
    assert biz.apology and 2 <= len(biz.fillers) <= 3 and biz.rules and biz.fallback_reply


def test_acme_business_is_english_plumbing(config):
    acme = config.business("acme")
    assert (acme.name, acme.language, acme.voice) == ("acme", "en-US", "en-US-Standard-C")
    assert "Acme Plumbing" in acme.greeting
    assert acme.apology == "Sorry, I'm having trouble, one moment."
    assert acme.fillers == ("One moment.", "Let me check.")
    assert acme.fallback_reply == "Sorry, could you say that again?"
    assert not acme.log_transcripts
    for rule, seeds in zip(acme.rules, (["hours", "open", "close"], ["price", "cost", "much"],
                                        ["appointment", "book", "tomorrow"], ["bye", "goodbye", "thanks"])):
        assert set(seeds) <= set(rule.keywords)


def _rules_reply(business, text: str) -> str:
    """localcloud's `rules` engine as specified: first rule with a keyword as a word, case-insensitive."""
    words = set(re.findall(r"[\w']+", text.lower()))
    return next((r.reply for r in business.rules if words & {k.lower() for k in r.keywords}),
                business.fallback_reply)


@pytest.mark.parametrize(("heard", "rule_index"), [
    # pocketsphinx 5.1 transcripts of espeak-ng en-us speech through 8 kHz mu-law (measured)
    ("well i do hope that tomorrow", 0),  # "What time do you open tomorrow?"
    ("you open on that", 0),            # "Are you open on Saturday?"
    ("are you open on the day", 0),
    ("how much it", 1),                 # "How much is it?"
    ("how do you charge there", 1),     # "How much do you charge for a repair?"
    ("how much got a lot get a leaky pipe", 1),  # "How much does it cost to fix a leaking pipe?"
    ("and you come tomorrow", 2),       # "Can you come tomorrow?"
    ("i booked a or tomorrow", 2),      # "Can I book an appointment for tomorrow?"
    ("good bye", 3),                    # "Okay, thanks. Goodbye."
    ("and you don't lie", 3),           # "Thank you, goodbye."
    ("i buy", 3),                       # "Bye bye."
])
def test_acme_rules_fire_on_rough_transcripts(config, heard, rule_index):
    acme = config.business("acme")
    assert _rules_reply(acme, heard) == acme.rules[rule_index].reply


def test_acme_rules_fall_back_when_nothing_matches(config):
    acme = config.business("acme")
    assert _rules_reply(acme, "you're wrong") == "Sorry, could you say that again?"


def test_business_lookup_falls_back_to_the_default(config):
    assert config.business("acme").name == "acme"
    assert config.business(None).name == "default"
    assert config.business("no-such-business").name == "default"


def test_config_is_immutable(config):
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.stt.batch_ms = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.businesses["x"] = config.business(None)  # type: ignore[index]


def test_every_key_and_default_is_declared_in_the_schema(config):
    """The loader's Config adds behaviour (with_overrides), never a key, and stays frozen."""
    assert [f.name for f in dataclasses.fields(Config)] == [f.name for f in dataclasses.fields(config_schema.ConfigValues)]
    assert isinstance(config, config_schema.ConfigValues) and not hasattr(config, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.default_business = "acme"  # type: ignore[misc]


def test_the_schema_imports_nothing_of_agentd():
    """agentd.config imports the schema; an import back would be a cycle."""
    tree = ast.parse(Path(config_schema.__file__).read_text(encoding="utf-8"))
    modules = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    modules += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert [m for m in modules if m.split(".")[0] == "agentd"] == []


# --- validation: each error names its key ------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    ({"stt.batch_ms": -5}, "stt.batch_ms: expected int ≥ 10, got -5"),
    ({"server.port": 70000}, "server.port: expected int in 0..65535, got 70000"),
    ({"server.port": True}, "server.port: expected int in 0..65535, got True"),
    ({"server.port": "8080"}, "server.port: expected int"),
    ({"server.path": "media"}, "server.path: expected string like /path"),
    ({"server.log_level": "debug"}, "server.log_level: expected one of DEBUG, INFO"),
    ({"server.media_timeout_ms": 0}, "server.media_timeout_ms: expected int ≥ 1, got 0"),
    ({"server.media_timeout_ms": 2.5}, "server.media_timeout_ms: expected int"),
    ({"audio.tx_lead_frames": 121}, "audio.tx_lead_frames: must be ≤ audio.tx_queue_frames (120), got 121"),
    ({"audio.tx_queue_frames": 0}, "audio.tx_queue_frames: expected int ≥ 1"),
    ({"vad.aggressiveness": 4}, "vad.aggressiveness: expected int in 0..3, got 4"),
    ({"vad.hangover_ms": -1}, "vad.hangover_ms: expected int ≥ 0, got -1"),
    ({"vad.speech_start_ms": 60.0}, "vad.speech_start_ms: expected int"),
    ({"turn.min_utt_s": "0.6"}, "turn.min_utt_s: expected number ≥ 0"),
    ({"turn.min_utt_s": float("nan")}, "turn.min_utt_s: expected number ≥ 0"),
    ({"turn.breath_min_ms": 200}, "turn.breath_min_ms: must be ≤ turn.breath_max_ms (120), got 200"),
    ({"turn.min_silence_short_s": 2.0}, "turn.min_silence_short_s: must be ≤ turn.min_silence_long_s"),
    ({"turn.barge_in_enabled": 1}, "turn.barge_in_enabled: expected bool, got 1"),
    ({"stt.endpoint": "eu-speech.googleapis.com"}, "stt.endpoint: expected string like host:port"),
    ({"stt.endpoint": "localhost:65536"}, "stt.endpoint: expected string like host:port"),
    ({"tts.endpoint": "localhost:0"}, "tts.endpoint: expected string like host:port"),
    ({"stt.language": "hebrew"}, "stt.language: expected string like xx-YY"),
    ({"stt.model": ""}, "stt.model: expected non-empty string, got ''"),
    ({"stt.open_timeout_ms": 0}, "stt.open_timeout_ms: expected int ≥ 1"),
    ({"tts.speaking_rate": 5}, "tts.speaking_rate: expected number in 0.25..4.0, got 5"),
    ({"llm.base_url": "api.openai.com/v1"}, "llm.base_url: expected string like http(s)://"),
    ({"llm.max_tokens_param": "max_output_tokens"},
     "llm.max_tokens_param: expected one of max_tokens, max_completion_tokens"),
    ({"llm.temperature": 2.5}, "llm.temperature: expected number in 0.0..2.0 (or unset), got 2.5"),
    ({"llm.api_key_env": "OPENAI-KEY"}, "llm.api_key_env: expected string like an environment variable name"),
    ({"stt.batchms": 60}, "stt.batchms: unknown key (did you mean batch_ms?)"),
    ({"default_business": "nope"}, "default_business: 'nope' is not a configured business (have: acme, default)"),
    ({"businesses.acme.language": "english"}, "businesses.acme.language: expected string like xx-YY"),
    ({"businesses.acme.voice": None}, "businesses.acme.voice: missing"),
    ({"businesses.acme.greeting": None}, "businesses.acme.greeting: missing"),
    ({"businesses.acme.system_prompt": None}, "businesses.acme.system_prompt: missing"),
    ({"businesses.acme.fillers": ["ok", ""]}, "businesses.acme.fillers: expected list of strings"),
    ({"businesses.acme.log_transcripts": "yes"}, "businesses.acme.log_transcripts: expected bool"),
    ({"businesses.acme.rules": [{"keywords": ["x"]}]}, "businesses.acme.rules[0].reply: missing"),
    ({"businesses.acme.rules": [{"keywords": [], "reply": "x"}]},
     "businesses.acme.rules[0].keywords: expected non-empty list of strings"),
    ({"businesses.acme.rules": {"keywords": ["x"]}}, "businesses.acme.rules: expected an array of tables"),
    ({"businesses.acme.colour": "red"}, "businesses.acme.colour: unknown key"),
    ({"businesses.two words": {"voice": "v", "greeting": "g", "system_prompt": "p"}},
     "businesses.two words: expected string like a name"),
])
def test_invalid_value_is_refused_naming_its_key(config, overrides, message):
    with pytest.raises(ConfigError) as err:
        config.with_overrides(**overrides)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(("text", "message"), [
    ("[stt]\nbatch_ms = -5\n", "stt.batch_ms: expected int ≥ 10, got -5"),
    ("[nope]\nx = 1\n", "nope: unknown section"),
    ("[stt]\nendpoint = 443\n", "stt.endpoint: expected string like host:port"),
    ("stt = 1\n", "stt: expected a table"),
    ("[businesses.default]\nvoice = \"v\"\n", "businesses.default.greeting: missing"),
    ("[server]\nport = 1\n", "businesses: at least one [businesses.NAME] table is required"),
    ("default_business = \"acme\"\n" + MINIMAL_BUSINESS, "default_business: 'acme' is not a configured business"),
])
def test_invalid_file_is_refused_naming_its_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, text)
    assert any(problem.startswith(message) for problem in problems(err.value))


def problems(error: ConfigError) -> list[str]:
    """The problems one ConfigError lists: its text, or the lines after "N problems:"."""
    lines = str(error).splitlines()
    return [line.strip() for line in lines[1:]] if lines[0].endswith("problems:") else [str(error)]


def test_every_problem_is_listed_not_only_the_first(tmp_path):
    text = '[stt]\nbatch_ms = -5\nendpont = "x:1"\n[server]\nport = "eighty"\n[nope]\n' + MINIMAL_BUSINESS
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, text, env={"AGENTD__LLM__MAX_TOKENS": "many"})
    assert str(err.value).startswith("5 problems:")
    assert sorted(p.split(":")[0] for p in problems(err.value)) == [
        "llm.max_tokens (from env AGENTD__LLM__MAX_TOKENS)", "nope", "server.port", "stt.batch_ms", "stt.endpont"]


def test_a_business_with_problems_lists_them_all(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, '[businesses.default]\nvoice = 5\nfillers = "um"\n')
    assert [p.split(":")[0] for p in problems(err.value)] == [
        "businesses.default.voice", "businesses.default.fillers", "businesses.default.greeting",
        "businesses.default.system_prompt"]


def test_unreadable_or_malformed_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.toml: cannot read config"):
        load_config(tmp_path / "missing.toml", env={})
    with pytest.raises(ConfigError, match=r"agentd.toml: invalid TOML"):
        load_text(tmp_path, "[stt\n")


def test_a_minimal_file_gets_every_default(tmp_path):
    cfg = load_text(tmp_path, MINIMAL_BUSINESS)
    assert cfg.stt == SttConfig() and cfg.llm == LlmConfig() and cfg.server == ServerConfig()
    biz = cfg.business(None)
    optional = (biz.apology, biz.fillers, biz.rules, biz.fallback_reply, biz.log_transcripts)
    assert optional == ("", (), (), "", False)


def test_business_language_defaults_to_stt_language(tmp_path):
    cfg = load_text(tmp_path, '[stt]\nlanguage = "en-GB"\n' + MINIMAL_BUSINESS)
    assert cfg.business(None).language == "en-GB"


def test_int_is_accepted_for_a_float_key(config):
    value = config.with_overrides(**{"turn.min_utt_s": 1}).turn.min_utt_s
    assert value == 1.0 and isinstance(value, float)


# --- secrets ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "key"), [
    ('[llm]\napi_key = "sk-123"\n', "llm.api_key"),
    ('[llm]\nopenai_apikey = "sk-123"\n', "llm.openai_apikey"),
    ('[twilio]\nauth_token = "abc"\n', "twilio.auth_token"),
    ('[stt]\nclient_secret = "abc"\n', "stt.client_secret"),
    ('[businesses.default]\nPassword = "hunter2"\n', "businesses.default.Password"),
])
def test_secret_looking_keys_are_refused_with_a_pointer_to_the_environment(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, text + MINIMAL_BUSINESS.replace("[businesses.default]", "[businesses.other]"))
    first, *others = problems(err.value)
    assert first.startswith(f"{key}: looks like a secret")
    assert "environment" in first and "credential file" in first
    assert not any(p.startswith(key) for p in others)  # said once, not also as an unknown key


def test_known_keys_that_merely_mention_tokens_are_fine(tmp_path):
    cfg = load_text(tmp_path, '[llm]\napi_key_env = "MY_KEY"\nmax_tokens = 99\nmax_tokens_param = "max_tokens"\n'
                    'first_token_timeout_ms = 2000\n' + MINIMAL_BUSINESS)
    assert (cfg.llm.api_key_env, cfg.llm.max_tokens, cfg.llm.first_token_timeout_ms) == ("MY_KEY", 99, 2000)


# --- environment overrides -----------------------------------------------------------------------

ALIAS_CASES = [
    ("ENABLE_STREAMING_STT", "0", "stt", "streaming_enabled", False),
    ("STT_BATCH_MS", "80", "stt", "batch_ms", 80),
    ("STT_PARTIAL_DEBOUNCE_MS", "120", "stt", "partial_debounce_ms", 120),
    ("STT_TIMEOUT_MS", "500", "stt", "final_timeout_ms", 500),
    ("VAD_HANGOVER_MS", "300", "vad", "hangover_ms", 300),
    ("MIN_UTT_SEC", "0.8", "turn", "min_utt_s", 0.8),
    ("REPLY_REFRACTORY_MS", "900", "turn", "refractory_ms", 900),
    ("GCP_STT_LANGUAGE", "en-US", "stt", "language", "en-US"),
    ("GCP_STT_MODEL", "latest_long", "stt", "model", "latest_long"),
    ("GOOGLE_CLOUD_SPEECH_ENDPOINT", "127.0.0.1:5005", "stt", "endpoint", "127.0.0.1:5005"),
]


def test_every_historical_variable_name_is_covered():
    assert {case[0] for case in ALIAS_CASES} == set(ENV_ALIASES)


@pytest.mark.parametrize(("var", "text", "section", "key", "expected"), ALIAS_CASES)
def test_historical_variable_overrides_its_key(var, text, section, key, expected):
    cfg = load_config(None, env={var: text})
    assert getattr(getattr(cfg, section), key) == expected


@pytest.mark.parametrize(("var", "text", "section", "key", "expected"), [
    ("AGENTD__LLM__BASE_URL", "http://127.0.0.1:8081/v1", "llm", "base_url", "http://127.0.0.1:8081/v1"),
    ("AGENTD__STT__TLS", "false", "stt", "tls", False),
    ("AGENTD__TURN__BARGE_IN_ENABLED", "no", "turn", "barge_in_enabled", False),
    ("AGENTD__TTS__SPEAKING_RATE", "1.25", "tts", "speaking_rate", 1.25),
    ("AGENTD__LLM__TEMPERATURE", "0.2", "llm", "temperature", 0.2),
    ("AGENTD__SERVER__TELEMETRY_DIR", "/var/lib/agentd/telemetry", "server", "telemetry_dir",
     "/var/lib/agentd/telemetry"),
    ("agentd__server__port".upper(), " 0 ", "server", "port", 0),
    ("AGENTD__SERVER__MEDIA_TIMEOUT_MS", "2000", "server", "media_timeout_ms", 2000),
])
def test_generic_variable_overrides_its_key(var, text, section, key, expected):
    cfg = load_config(None, env={var: text})
    assert getattr(getattr(cfg, section), key) == expected


def test_generic_variable_sets_the_default_business():
    assert load_config(None, env={"AGENTD__DEFAULT_BUSINESS": "acme"}).default_business == "acme"


def test_optional_key_is_unset_by_an_empty_variable(config):
    warm = config.with_overrides(**{"llm.temperature": 0.5})
    assert warm.llm.temperature == 0.5
    assert load_config(None, env={"AGENTD__LLM__TEMPERATURE": ""}).llm.temperature is None


@pytest.mark.parametrize(("text", "expected"), [
    ("1", True), ("true", True), ("YES", True), ("0", False), ("False", False), ("no", False),
])
def test_booleans_from_the_environment(text, expected):
    assert load_config(None, env={"ENABLE_STREAMING_STT": text}).stt.streaming_enabled is expected


@pytest.mark.parametrize(("env", "message"), [
    ({"STT_BATCH_MS": "abc"}, "stt.batch_ms (from env STT_BATCH_MS): expected int ≥ 10, got 'abc'"),
    ({"STT_BATCH_MS": "5"}, "stt.batch_ms (from env STT_BATCH_MS): expected int ≥ 10, got 5"),
    ({"ENABLE_STREAMING_STT": "on"},
     "stt.streaming_enabled (from env ENABLE_STREAMING_STT): expected 1/0/true/false/yes/no, got 'on'"),
    ({"GOOGLE_CLOUD_SPEECH_ENDPOINT": "eu-speech.googleapis.com"},
     "stt.endpoint (from env GOOGLE_CLOUD_SPEECH_ENDPOINT): expected string like host:port"),
    ({"AGENTD__AUDIO__TX_LEAD_FRAMES": "500"},
     "audio.tx_lead_frames (from env AGENTD__AUDIO__TX_LEAD_FRAMES): must be ≤ audio.tx_queue_frames"),
    ({"AGENTD__STT__BATCHMS": "60"}, "AGENTD__STT__BATCHMS: unknown key stt.batchms"),
    ({"AGENTD__SERVER__MEDIA_TIMEOUT_MS": "-1"},
     "server.media_timeout_ms (from env AGENTD__SERVER__MEDIA_TIMEOUT_MS): expected int ≥ 1, got -1"),
    ({"AGENTD__TWILIO__URL": "x"}, "AGENTD__TWILIO__URL: expected AGENTD__SECTION__KEY"),
    ({"AGENTD__BUSINESSES__ACME__VOICE": "x"}, "AGENTD__BUSINESSES__ACME__VOICE: expected AGENTD__SECTION__KEY"),
    ({"AGENTD__LLM__API_KEY": "sk-123"}, "AGENTD__LLM__API_KEY: secrets are not config"),
])
def test_bad_variable_is_refused_naming_variable_and_key(env, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, env=env)
    assert str(err.value).startswith(message)


def test_generic_name_wins_over_the_historical_one():
    cfg = load_config(None, env={"STT_BATCH_MS": "80", "AGENTD__STT__BATCH_MS": "100"})
    assert cfg.stt.batch_ms == 100


def test_unrelated_variables_are_ignored():
    cfg = load_config(None, env={"PATH": "/bin", "AGENTD_LOG": "x", "OPENAI_API_KEY": "sk-123"})
    assert cfg == load_config(None, env={})


def test_process_environment_is_the_default(monkeypatch):
    monkeypatch.setenv("STT_BATCH_MS", "70")
    assert load_config(None).stt.batch_ms == 70


def test_llm_api_key_is_read_from_the_named_variable_and_never_shown(config):
    env = {"OPENAI_API_KEY": "sk-live-123", "OTHER_KEY": "sk-other"}
    assert config.llm_api_key(env) == "sk-live-123"
    assert config.with_overrides(**{"llm.api_key_env": "OTHER_KEY"}).llm_api_key(env) == "sk-other"
    assert config.with_overrides(**{"llm.api_key_env": ""}).llm_api_key(env) is None
    assert config.llm_api_key({"OPENAI_API_KEY": ""}) is None and config.llm_api_key({}) is None
    assert "sk-live" not in repr(load_config(None, env=env))


def test_llm_api_key_defaults_to_the_process_environment(config, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-process")
    assert config.llm_api_key() == "sk-from-process"


# --- with_overrides and the summary ----------------------------------------------------------------

def test_with_overrides_returns_a_new_validated_config(config):
    local = config.with_overrides(**{"stt.endpoint": "127.0.0.1:5005", "stt.tls": False,
                                     "businesses.acme.greeting": "Hi there."})
    assert (local.stt.endpoint, local.stt.tls, local.business("acme").greeting) == ("127.0.0.1:5005", False,
                                                                                    "Hi there.")
    assert (config.stt.endpoint, config.stt.tls) == ("eu-speech.googleapis.com:443", True)
    assert local.stt.batch_ms == config.stt.batch_ms


def test_with_overrides_none_restores_the_default(config):
    changed = config.with_overrides(**{"vad.hangover_ms": 400})
    assert changed.with_overrides(**{"vad.hangover_ms": None}).vad.hangover_ms == 220


def test_with_overrides_keeps_environment_values():
    cfg = load_config(None, env={"STT_BATCH_MS": "80"})
    assert cfg.with_overrides(**{"stt.tls": False}).stt.batch_ms == 80


def test_with_overrides_works_on_a_config_built_by_hand(config):
    solo = dataclasses.replace(config.business("acme"), name="solo")
    bare = Config(businesses={"solo": solo}, default_business="solo")
    tuned = bare.with_overrides(**{"stt.batch_ms": 100})
    assert tuned.stt.batch_ms == 100
    assert tuned.business(None) == solo


def test_with_overrides_round_trips_the_shipped_config(config):
    assert config.with_overrides() == config


@pytest.mark.parametrize("key", ["stt.", ".stt", "stt..x", "stt.endpoint.host"])
def test_with_overrides_rejects_malformed_keys(config, key):
    with pytest.raises(ConfigError):
        config.with_overrides(**{key: 1})


def test_summary_is_short_and_free_of_prompts(config):
    summary = config_summary(config)
    assert "eu-speech.googleapis.com:443" in summary and "gpt-4o-mini" in summary
    assert "OPENAI_API_KEY" in summary  # the variable's name, never its value
    for biz in config.businesses.values():
        assert biz.system_prompt not in summary and biz.greeting not in summary
    assert 3 <= len(summary.splitlines()) <= 8
