"""agentd.logsafe: what a peer chose reaches a log line escaped, capped, validated and redacted."""

from __future__ import annotations

import pytest

from agentd import logsafe


@pytest.mark.parametrize(("text", "shown"), [
    ("plain text", "plain text"),
    ("line\nERROR forged", "line\\x0aERROR forged"),
    ("\x1b[31mred\x00", "\\x1b[31mred\\x00"),
    ("lone \udc80 surrogate", "lone \\udc80 surrogate"),
    ("שלום", "שלום"),
])
def test_escape_shows_every_non_printable_as_an_escape(text, shown):
    assert logsafe.escape(text) == shown


def test_escape_caps_a_value_and_says_how_much_was_cut():
    assert logsafe.escape("a" * 250, limit=200) == "a" * 200 + "...(+50 chars)"


def test_sids_are_shown_only_in_twilios_format():
    good = "CA" + "0123456789abcdef" * 2
    assert logsafe.sid(good, "CA") == good
    assert logsafe.sid("MZ" + good[2:], "CA").startswith("invalid:")
    assert logsafe.sid("CA\nforged", "CA") == "invalid:CA\\x0aforged"
    assert len(logsafe.sid("CA" + "f" * 60_000, "CA")) < 80


def test_redact_removes_bearer_tokens_api_keys_and_configured_secrets():
    text = ("echo: Authorization: Bearer abc.def-123 key sk-live_0123456789 "
            "twilio=the-auth-token-value basic%20dXNlcjpwYXNz")
    shown = logsafe.redact(text, secrets=["the-auth-token-value"])
    for secret in ("abc.def-123", "sk-live_0123456789", "the-auth-token-value", "dXNlcjpwYXNz"):
        assert secret not in shown
    assert shown == ("echo: Authorization: Bearer [redacted] key sk-[redacted] twilio=[redacted] "
                     "basic [redacted]")


def test_redact_happens_before_the_cap():
    shown = logsafe.redact("x" * 190 + " sk-0123456789abcdef", limit=200)
    assert "sk-0123" not in shown
