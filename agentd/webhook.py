"""Twilio's voice webhook and the stream's `<Connect action>`, as pure request -> answer functions.

Theory of operation
-------------------
An operator points the phone number's "A call comes in" webhook at
``https://HOST{server.voice_path}`` and nothing else:

1. Twilio POSTs the call's form (``CallSid``, ``From``, ``To``, ...) to the
   voice path. `Webhook.voice` answers `twiml.connect_stream`: the media
   socket at ``server.public_url``, the business chosen by the called number
   (``To`` in a business's ``numbers``, else the default business), and the
   per-call token (`security.make_call_token`) when
   ``server.call_token_param`` is set.
2. The call runs on the media socket. An agent that transfers the call
   records it here (`CallOutcomes.record_transfer`) before it ends the
   stream.
3. When the stream ends, Twilio POSTs to the `<Connect action>` URL
   (``server.after_path``). `Webhook.after` answers `<Dial>` to the recorded
   number, else `<Hangup/>`.

Both URLs are ``server.public_url`` with its scheme made https (wss) or
http (ws) and its path replaced (`webhook_urls`): the URL as Twilio requests
it, which is what its signature covers. Twilio signs a POST with
``X-Twilio-Signature: base64(HMAC-SHA1(auth token, URL + every POST
parameter's name and value, sorted by name, concatenated))``; the check runs
whenever an auth token is configured (with ``server.public_url`` set,
agentd does not start without one) and refuses with 403 otherwise, exactly
as on the upgrade.

Nothing here does I/O: the front door reads the request (`agentd.http1`) and
`Webhook.routes()` gives it the two `(method, path)` handlers; each answers
from the request alone, synchronously (`voice`, `after`).
"""

from __future__ import annotations

import logging
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from agentd import logsafe, twiml
from agentd.config import Config
from agentd.errors import CallProtocolError
from agentd.http1 import Handler, Request, Response, Routes
from agentd.security import SIGNATURE_HEADER, make_call_token, same_secret, twilio_signature

__all__ = ["CallOutcomes", "Webhook", "WebhookError", "WebhookUrls", "parse_form", "post_signature",
           "webhook_urls"]

log = logging.getLogger(__name__)

MAX_FORM_BYTES = 16_384  # Twilio's voice webhook form is ~1 KB
DEFAULT_REMEMBERED_OUTCOMES = 10_000


class WebhookError(CallProtocolError):
    """The webhook request is malformed (not a form, too large); answered with 400."""


def parse_form(body: bytes) -> tuple[tuple[str, str], ...]:
    """An `application/x-www-form-urlencoded` body as (name, value) pairs, in order.

    Raises WebhookError for a body over MAX_FORM_BYTES, not UTF-8, or not a form.
    """
    if len(body) > MAX_FORM_BYTES:
        raise WebhookError(f"form body is {len(body)} bytes, more than {MAX_FORM_BYTES}")
    try:
        text = body.decode("utf-8")
        return tuple(urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text)))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WebhookError(f"form body is not application/x-www-form-urlencoded: {exc}") from exc


def post_signature(auth_token: str, url: str, pairs: Iterable[tuple[str, str]]) -> str:
    """The ``X-Twilio-Signature`` Twilio sends for a POST of `pairs` to `url`."""
    return twilio_signature(auth_token, url + "".join(name + value for name, value in sorted(pairs)))


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookUrls:
    """The public URLs of the two webhooks, as Twilio requests (and signs) them."""

    voice: str
    after: str


def webhook_urls(config: Config) -> WebhookUrls | None:
    """`server.public_url` turned into the webhooks' URLs; None when it is not set."""
    public = urllib.parse.urlsplit(config.server.public_url)
    if not public.netloc:
        return None
    scheme = "https" if public.scheme == "wss" else "http"
    voice, after = (urllib.parse.urlunsplit((scheme, public.netloc, path, "", ""))
                    for path in (config.server.voice_path, config.server.after_path))
    return WebhookUrls(voice=voice, after=after)


class CallOutcomes:
    """What each call's agent decided for after the stream: CallSid -> transfer number.

    Bounded: the last `remember` decisions are kept; `take` removes one, as
    Twilio requests the action once per call. A call with no entry hangs up.
    """

    def __init__(self, remember: int = DEFAULT_REMEMBERED_OUTCOMES) -> None:
        self._remember = remember
        self._transfers: OrderedDict[str, str] = OrderedDict()

    def record_transfer(self, call_sid: str, number: str) -> None:
        """The call `call_sid` is to be transferred to `number` when its stream ends."""
        self._transfers[call_sid] = number
        if len(self._transfers) > self._remember:
            self._transfers.popitem(last=False)

    def take(self, call_sid: str) -> str | None:
        """The transfer number recorded for `call_sid` (now forgotten), or None."""
        return self._transfers.pop(call_sid, None)


class Webhook:
    """The two handlers; construct once per daemon with `from_config`."""

    def __init__(self, config: Config, *, auth_token: str | None, call_token_secret: str | None,
                 outcomes: CallOutcomes) -> None:
        self._config = config
        self._urls = webhook_urls(config)
        self._auth_token = auth_token
        self._call_token_secret = call_token_secret
        self.outcomes = outcomes

    @classmethod
    def from_config(cls, config: Config, outcomes: CallOutcomes, env: Mapping[str, str] | None = None) -> Webhook:
        """Handlers with the secrets `config` names (env None: os.environ)."""
        return cls(config, auth_token=config.twilio_auth_token(env), outcomes=outcomes,
                   call_token_secret=config.call_token_secret(env) if config.server.call_token_param else None)

    def routes(self) -> Routes:
        """The front door's route table entries: POST server.voice_path and server.after_path."""
        server = self._config.server
        return {("POST", server.voice_path): _handler(self.voice), ("POST", server.after_path): _handler(self.after)}

    def voice(self, request: Request) -> Response:
        """POST server.voice_path: the TwiML connecting the call to the media socket."""
        if self._urls is None:
            log.error("voice webhook called but server.public_url is not set: no stream URL to answer")
            return _text(503, "server.public_url is not set\n")
        checked = self._checked_form(self._urls.voice, request)
        if isinstance(checked, Response):
            return checked
        form = dict(checked)
        business = self._config.business_for_number(form.get("To"))
        parameters = {"business": business.name}
        token_param = self._config.server.call_token_param
        if token_param and self._call_token_secret:
            parameters[token_param] = make_call_token(self._call_token_secret, form.get("CallSid", ""))
        # Form values are the peer's words, even signed: escaped like every peer value in a log line.
        log.info("call=%s voice webhook: To=%s business=%s", logsafe.sid(form.get("CallSid", "?"), "CA"),
                 logsafe.escape(form.get("To", "?")), business.name)
        return _xml(twiml.connect_stream(self._config.server.public_url, self._urls.after, parameters))

    def after(self, request: Request) -> Response:
        """POST server.after_path: `<Dial>` the number the agent transferred to, else `<Hangup/>`."""
        if self._urls is None:
            return _text(503, "server.public_url is not set\n")
        checked = self._checked_form(self._urls.after, request)
        if isinstance(checked, Response):
            return checked
        call_sid = dict(checked).get("CallSid", "")
        number = self.outcomes.take(call_sid)
        log.info("call=%s after the stream: %s", logsafe.sid(call_sid or "?", "CA"),
                 f"transfer to {number}" if number else "hang up")
        return _xml(twiml.dial(number) if number else twiml.hangup())

    def _checked_form(self, url: str, request: Request) -> tuple[tuple[str, str], ...] | Response:
        """The form, if it parses and (with an auth token) carries a valid signature; else the refusal."""
        try:
            pairs = parse_form(request.body)
        except WebhookError as exc:
            log.warning("webhook %s: %s", url, exc)
            return _text(400, "bad form\n")
        if self._auth_token is not None and not self._signed(url, request, pairs):
            log.warning("webhook %s: %s missing or wrong; refused", url, SIGNATURE_HEADER)
            return _text(403, "forbidden\n")
        return pairs

    def _signed(self, url: str, request: Request, pairs: Iterable[tuple[str, str]]) -> bool:
        given = request.header(SIGNATURE_HEADER)  # None unless sent exactly once
        expected = post_signature(self._auth_token or "", url, pairs)
        return given is not None and same_secret(given.strip(), expected)


def _handler(answer: Callable[[Request], Response]) -> Handler:
    """A synchronous answer as the front door's (async) handler."""
    async def handle(request: Request) -> Response:
        return answer(request)
    return handle


def _xml(document: str) -> Response:
    return Response(status=200, body=document.encode("utf-8"), headers=(("content-type", twiml.CONTENT_TYPE),))


def _text(status: int, text: str) -> Response:
    return Response(status=status, body=text.encode("utf-8"))
