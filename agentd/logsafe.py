"""Peer-supplied text made safe for a log line: escaped, capped, validated, redacted.

A log line is read by people and parsed by tools, so a value a peer chose (a
callSid, a close reason, a header, an upstream error body) must not be able
to add a line, move the cursor, or fill the disk. Every such value goes
through one of these pure functions before it reaches a log call:

- `escape(text, limit)`: every non-printable character (newline, ESC, NUL,
  a lone surrogate, ...) shown as ``\\xNN`` / ``\\uNNNN``, then capped at
  `limit` characters with a count of what was cut.
- `sid(value, prefix)`: a Twilio SID is its prefix (``CA`` call, ``MZ``
  stream) and 32 hex digits; a valid one is shown as is, anything else as
  ``invalid:`` plus a short escaped excerpt, so a forged value is visibly one.
- `redact(text, secrets)`: bearer tokens, ``sk-``-style API keys and each of
  `secrets` (the configured values: LLM key, Twilio auth token, call-token
  secret) replaced by ``[redacted]``, then escaped and capped. Upstream error
  bodies are logged only through it: an endpoint that echoes our
  ``Authorization`` header must not put the key into the log.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["DEFAULT_LIMIT", "escape", "excerpt", "is_sid", "redact", "sid"]

DEFAULT_LIMIT = 200  # characters of one peer value in one log line
_SID_EXCERPT = 40
_MIN_SECRET_CHARS = 4  # shorter "secrets" would redact ordinary words

_SID_HEX = re.compile(r"[0-9a-fA-F]{32}")
_BEARER = re.compile(r"(?i)\b(bearer|basic)(\s+|%20|\+)[^\s\"',;&]+")
_API_KEY = re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}")
REDACTED = "[redacted]"


def _escape_char(c: str) -> str:
    code = ord(c)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def escape(text: str, limit: int = DEFAULT_LIMIT) -> str:
    """`text` with non-printables escaped (``\\xNN``) and at most `limit` characters of it kept."""
    cut = len(text) - limit
    if cut > 0:
        text = text[:limit]
    safe = "".join(c if c.isprintable() else _escape_char(c) for c in text)
    return f"{safe}...(+{cut} chars)" if cut > 0 else safe


def excerpt(body: bytes, chars: int) -> str:
    """An upstream's body as one line for an error message: decoded leniently, runs of
    whitespace made one space, at most `chars` characters (then "...")."""
    text = " ".join(body.decode("utf-8", "replace").split())
    return text if len(text) <= chars else text[:chars] + "..."


def is_sid(value: str, prefix: str) -> bool:
    """True if `value` is `prefix` followed by exactly 32 hex digits (Twilio's SID format)."""
    return len(value) == 34 and value.startswith(prefix) and _SID_HEX.fullmatch(value, 2) is not None


def sid(value: str, prefix: str) -> str:
    """`value` if it is a valid `prefix` SID, else ``invalid:`` and a short escaped excerpt."""
    return value if is_sid(value, prefix) else "invalid:" + escape(value, _SID_EXCERPT)


def redact(text: str, secrets: Iterable[str] = (), limit: int = DEFAULT_LIMIT) -> str:
    """`text` with credentials replaced by ``[redacted]``, then escaped and capped (see module doc).

    Secrets are replaced before the cap, so a key cut in half by the cap is
    never half-shown.
    """
    for secret in sorted((s for s in secrets if s and len(s) >= _MIN_SECRET_CHARS), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _API_KEY.sub("sk-" + REDACTED, text)
    return escape(text, limit)
