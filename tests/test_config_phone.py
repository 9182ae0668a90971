"""agentd.config: the phone-conversation keys (numbers, transfer, dtmf, tools, reprompt, handoff, idle, webhook)."""

import datetime

import pytest

from agentd.config import BusinessTool, load_config
from agentd.errors import ConfigError

PHONE_BUSINESS = """
[turn]
idle_reprompt_s = 5
[server]
voice_path = "/hooks/voice"
[businesses.default]
voice = "en-US-Standard-C"
greeting = "Hello."
system_prompt = "Be brief."
[businesses.clinic]
voice = "en-US-Standard-C"
greeting = "Clinic, hello."
system_prompt = "You answer the clinic's phone."
numbers = ["+15551230000", "+15551230009"]
reprompt = "Are you still there?"
handoff = "Connecting you."
[businesses.clinic.transfer]
front_desk = "+15551230001"
nurse = "+442071234567"
[businesses.clinic.dtmf]
"0" = "transfer_call:front_desk"
"9" = "end_call"
[[businesses.clinic.tools]]
name = "next_free_slot"
description = "The next free appointment slot for a service."
url = "https://clinic.example/api/slots"
timeout_ms = 2500
parameters = { type = "object", properties = { service = { type = "string" } }, required = ["service"] }
"""


@pytest.fixture
def phone(tmp_path):
    path = tmp_path / "agentd.toml"
    path.write_text(PHONE_BUSINESS, encoding="utf-8")
    return load_config(path, env={})


def test_phone_keys_are_read_from_the_file(phone):
    clinic = phone.business("clinic")
    assert clinic.numbers == ("+15551230000", "+15551230009")
    assert dict(clinic.transfer) == {"front_desk": "+15551230001", "nurse": "+442071234567"}
    assert dict(clinic.dtmf) == {"0": "transfer_call:front_desk", "9": "end_call"}
    assert (clinic.reprompt, clinic.handoff) == ("Are you still there?", "Connecting you.")
    [tool] = clinic.tools
    assert isinstance(tool, BusinessTool)
    assert (tool.name, tool.url, tool.timeout_ms) == ("next_free_slot", "https://clinic.example/api/slots", 2500)
    assert tool.parameters["required"] == ["service"]
    turn = phone.turn
    assert (turn.idle_reprompt_s, turn.idle_max_reprompts, turn.dtmf_digit_timeout_ms) == (5.0, 2, 3000)
    assert (phone.server.voice_path, phone.server.after_path) == ("/hooks/voice", "/twilio/after")


def test_tables_are_read_only_and_survive_with_overrides(phone):
    clinic = phone.business("clinic")
    with pytest.raises(TypeError):
        clinic.transfer["x"] = "+15551230002"  # type: ignore[index]
    again = phone.with_overrides(**{"turn.idle_max_reprompts": 3}).business("clinic")
    assert again.tools == clinic.tools and dict(again.transfer) == dict(clinic.transfer)


def test_the_called_number_picks_the_business_else_the_default(phone):
    assert phone.business_for_number("+15551230009").name == "clinic"
    assert phone.business_for_number("+15559999999").name == "default"
    assert phone.business_for_number(None).name == "default"


def test_a_business_without_phone_keys_gets_empty_ones(phone):
    plain = phone.business("default")
    assert (plain.numbers, dict(plain.transfer), dict(plain.dtmf), plain.tools) == ((), {}, {}, ())
    assert plain.reprompt == plain.handoff == ""


def test_shipped_businesses_have_their_spoken_lines_and_acme_a_front_desk():
    config = load_config(None, env={})
    for business in config.businesses.values():
        assert business.reprompt and business.handoff
    acme = config.business("acme")
    assert set(acme.transfer) == {"front_desk"} and acme.dtmf["0"] == "transfer_call:front_desk"


def _tool(**fields) -> dict:
    """A [[businesses.NAME.tools]] entry, valid unless `fields` say otherwise."""
    return {"name": "lookup", "description": "Look something up.", "url": "https://clinic.example/lookup", **fields}


@pytest.mark.parametrize("url", ["http://127.0.0.1:8999/slots", "http://localhost/x", "http://[::1]:80/",
                                 "https://clinic.example/api?v=2"])
def test_tool_urls_must_be_https_except_to_loopback(phone, url):
    config = phone.with_overrides(**{"businesses.clinic.tools": [_tool(url=url)]})
    assert config.business("clinic").tools[0].url == url


def test_a_tool_schema_may_name_secret_looking_properties(phone):
    schema = {"type": "object", "properties": {"booking_token": {"type": "string"}}}
    config = phone.with_overrides(**{"businesses.clinic.tools": [_tool(parameters=schema)]})
    assert "booking_token" in config.business("clinic").tools[0].parameters["properties"]
    with pytest.raises(ConfigError, match="looks like a secret"):
        phone.with_overrides(**{"businesses.clinic.tools": [_tool(api_token="x")]})


def test_a_rule_may_be_a_tool_call_alone(phone):
    config = phone.with_overrides(**{"businesses.clinic.rules": [{"keywords": ["bye"], "tool": "end_call"}]})
    assert config.business("clinic").rules[0].reply == ""


@pytest.mark.parametrize(("overrides", "message"), [
    ({"businesses.clinic.numbers": ["5551230000"]}, "businesses.clinic.numbers: expected list of strings like E.164"),
    ({"businesses.default.numbers": ["+15551230000"]},
     "businesses.clinic.numbers: +15551230000 is already a number of businesses.default"),
    ({"businesses.clinic.transfer": {"front_desk": "555-0100"}},
     "businesses.clinic.transfer: expected table of strings"),
    ({"businesses.clinic.transfer": {"front desk": "+15551230001"}}, "businesses.clinic.transfer: expected table"),
    ({"businesses.clinic.dtmf": {"12": "end_call"}}, "businesses.clinic.dtmf: expected table of strings"),
    ({"businesses.clinic.dtmf": {"1": "hang_up"}}, "businesses.clinic.dtmf: expected table of strings"),
    ({"businesses.clinic.dtmf": {"1": "transfer_call:billing"}},
     "businesses.clinic.dtmf.1: 'billing' is not in [businesses.clinic.transfer]"),
    ({"businesses.clinic.tools": [_tool(url="http://clinic.example/slots")]},
     "businesses.clinic.tools[0].url: expected string like https://host/path"),
    ({"businesses.clinic.tools": [_tool(name="end_call")]},
     "businesses.clinic.tools[0].name: 'end_call' is the agent's own tool"),
    ({"businesses.clinic.tools": [_tool(), _tool()]}, "businesses.clinic.tools[1].name: 'lookup' is declared twice"),
    ({"businesses.clinic.tools": [_tool(name="look up")]},
     "businesses.clinic.tools[0].name: expected string like 1-64"),
    ({"businesses.clinic.tools": [_tool(parameters={"type": "string"})]},
     'businesses.clinic.tools[0].parameters: expected a JSON schema with type = "object"'),
    ({"businesses.clinic.tools": [_tool(parameters={"type": "object", "default": datetime.date(2026, 1, 1)})]},
     'businesses.clinic.tools[0].parameters: expected a JSON schema with type = "object"'),
    ({"businesses.clinic.dtmf": {"#": "end_call"}}, "businesses.clinic.dtmf: expected table of strings"),
    ({"businesses.clinic.tools": [_tool(timeout_ms=0)]}, "businesses.clinic.tools[0].timeout_ms: expected int ≥ 1"),
    ({"businesses.clinic.tools": [{"name": "x", "url": "https://a.example/"}]},
     "businesses.clinic.tools[0].description: missing"),
    ({"businesses.clinic.rules": [{"keywords": ["x"]}]}, "businesses.clinic.rules[0].reply: missing"),
    ({"turn.idle_reprompt_s": 0}, "turn.idle_reprompt_s: expected number ≥ 1"),
    ({"turn.idle_max_reprompts": -1}, "turn.idle_max_reprompts: expected int ≥ 0"),
    ({"turn.dtmf_digit_timeout_ms": 0}, "turn.dtmf_digit_timeout_ms: expected int ≥ 1"),
    ({"server.voice_path": "twilio/voice"}, "server.voice_path: expected string like /path"),
])
def test_invalid_phone_keys_are_refused_naming_the_key(phone, overrides, message):
    with pytest.raises(ConfigError) as err:
        phone.with_overrides(**overrides)
    assert message in str(err.value)  # among every problem found (a bad table can leave knock-on ones)
