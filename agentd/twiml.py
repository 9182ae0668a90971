"""TwiML, the XML Twilio asks for at a call's turning points: pure rendering.

Three answers:

* `connect_stream`: the voice webhook's answer. `<Connect action=AFTER>`
  holds the call on one bidirectional `<Stream url=WSS>` (agentd's media
  socket) with `<Parameter>`s (the business, the per-call token). When the
  stream ends, Twilio requests the `action` URL for what to do next.
* `dial`: the `action`'s answer when the agent transferred the call:
  `<Dial>` the target number.
* `hangup`: the `action`'s answer otherwise: `<Hangup/>`.

Every text and attribute value is XML-escaped (quotes included), so a value
that came from a request can never change the document's structure.
"""

from __future__ import annotations

from collections.abc import Mapping
from xml.sax.saxutils import escape, quoteattr

__all__ = ["CONTENT_TYPE", "connect_stream", "dial", "hangup"]

CONTENT_TYPE = "text/xml; charset=utf-8"
_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>'
# Twilio's limit on a <Parameter>'s name and value, each.
MAX_PARAMETER_CHARS = 500


def _response(body: str) -> str:
    return f"{_DECLARATION}<Response>{body}</Response>"


def connect_stream(stream_url: str, action_url: str, parameters: Mapping[str, str]) -> str:
    """`<Connect action><Stream url>` with one `<Parameter>` per item, in order.

    Raises ValueError for a parameter name or value over Twilio's 500-character
    limit (our own bug: names are config, values are ours).
    """
    params = []
    for name, value in parameters.items():
        if len(name) > MAX_PARAMETER_CHARS or len(value) > MAX_PARAMETER_CHARS:
            raise ValueError(f"<Parameter> {name[:40]!r}: name and value must be at most {MAX_PARAMETER_CHARS} chars")
        params.append(f"<Parameter name={quoteattr(name)} value={quoteattr(value)}/>")
    stream = f"<Stream url={quoteattr(stream_url)}>{''.join(params)}</Stream>"
    return _response(f"<Connect action={quoteattr(action_url)} method=\"POST\">{stream}</Connect>")


def dial(number: str) -> str:
    """Transfer the caller: `<Dial>` to `number` (E.164)."""
    return _response(f"<Dial>{escape(number)}</Dial>")


def hangup() -> str:
    """End the call."""
    return _response("<Hangup/>")
