"""Who may open a call: Twilio's upgrade signature and a per-call token.

Theory of operation
-------------------
Two independent checks, each optional, each failing closed.

1. **Upgrade signature** (`SignatureCheck`). Twilio signs the WebSocket upgrade
   with ``x-twilio-signature: base64(HMAC-SHA1(auth_token, URL))``, URL being
   the ``wss://`` URL exactly as written in the TwiML (``server.public_url``;
   reverse proxies rewrite scheme and host, so it is configured, not rebuilt
   from the request). A Media Streams upgrade has no POST body and the TwiML
   URL no query string, so for one deployment the expected signature is a
   constant, computed once at startup and compared with `hmac.compare_digest`;
   an upgrade that does carry a query string is checked against the URL with
   it, as Twilio would have signed it. What that buys: only someone who
   knows the account's auth token can mint it. What it does not: the value is
   the same on every call, so a captured upgrade can be replayed.

2. **Per-call token** (`CallTokenCheck`), which closes that gap. The TwiML
   webhook adds ``<Parameter name="{server.call_token_param}"
   value="{make_call_token(secret, CallSid)}"/>``; agentd checks it once, on
   ``start``: it must equal hex HMAC-SHA256(secret, start.callSid), and that
   CallSid must not have started a stream before (single use). Being a MAC of
   the CallSid, it needs no state shared with the webhook. The replay memory is
   the last `remember` CallSids, in this process only (a restart forgets).

`Gatekeeper.from_config` decides at startup which checks run. Fail closed: a
check that is configured but whose secret variable is unset raises
ConfigError, so agentd refuses to start rather than silently serve the calls
it was told to check. With neither check configured it logs one warning and
lets every call in (development, localcloud).

Nothing here logs, stores in a repr, or puts into an error message a secret,
a signature or a token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agentd.codecs import twilio
from agentd.config import Config
from agentd.errors import AgentdError, CallProtocolError, ConfigError

__all__ = ["SIGNATURE_HEADER", "CallTokenCheck", "CallTokenError", "Gatekeeper", "SignatureCheck",
           "UpgradeRefused", "make_call_token", "twilio_signature"]

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "x-twilio-signature"
DEFAULT_REMEMBERED_CALLS = 10_000  # ~0.5 MB of CallSids; far more than calls within any replay window


class UpgradeRefused(AgentdError):
    """The WebSocket upgrade failed the signature check; the message says why (never the value)."""


class CallTokenError(CallProtocolError):
    """The `start` message's per-call token is missing, wrong or reused; close that call (1008)."""


def twilio_signature(auth_token: str, url: str) -> str:
    """base64(HMAC-SHA1(auth_token, url)): the ``x-twilio-signature`` Twilio sends for `url`."""
    return _signature(auth_token.encode(), url).decode("ascii")


def _signature(key: bytes, url: str) -> bytes:
    return base64.b64encode(hmac.new(key, url.encode(), hashlib.sha1).digest())


def same_secret(given: str, expected: str | bytes) -> bool:
    """Does a peer's signature or token equal ours? Constant-time; a non-ASCII value (which
    compare_digest refuses) is simply wrong."""
    expected = expected if isinstance(expected, bytes) else expected.encode("ascii")
    return given.isascii() and hmac.compare_digest(given.encode("ascii"), expected)


def make_call_token(secret: str, call_sid: str) -> str:
    """The per-call token for `call_sid`: lowercase hex HMAC-SHA256(secret, call_sid).

    For the TwiML webhook (the side that answers Twilio's voice webhook and
    knows the CallSid from its POST body): put the result in the Stream, as
    ``<Parameter name="{server.call_token_param}" value="{token}"/>``, with
    `secret` the value of the variable named by ``server.call_token_secret_env``.
    The same inputs always give the same token, so the webhook and agentd share
    only the secret. Other languages: HMAC-SHA256, key = UTF-8 secret, message =
    UTF-8 CallSid, hex digest (agentd also accepts uppercase hex).
    """
    return hmac.new(secret.encode(), call_sid.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class SignatureCheck:
    """Checks ``x-twilio-signature`` on an upgrade against one configured public URL."""

    public_url: str
    key: bytes = field(repr=False)  # the auth token, UTF-8
    expected: bytes = field(repr=False)  # the base64 signature of public_url, ASCII

    @classmethod
    def for_url(cls, auth_token: str, public_url: str) -> SignatureCheck:
        return cls(public_url=public_url, key=auth_token.encode(),
                   expected=twilio_signature(auth_token, public_url).encode("ascii"))

    def verify(self, headers: Iterable[tuple[str, str]], query: str = "") -> None:
        """Return if exactly one signature header is present and valid for the URL; else raise UpgradeRefused.

        The URL is ``public_url`` plus the request's ``?query`` when it has one,
        as Twilio signs the URL it requested: a query string the TwiML did not
        have changes the signature, so it cannot ride along on a captured one.
        """
        values = [value for name, value in headers if name.lower() == SIGNATURE_HEADER]
        if not values:
            raise UpgradeRefused(f"{SIGNATURE_HEADER} missing")
        if len(values) > 1:
            raise UpgradeRefused(f"{SIGNATURE_HEADER} sent {len(values)} times")
        expected = self.expected if not query else _signature(self.key, f"{self.public_url}?{query}")
        if not same_secret(values[0].strip(), expected):
            url = self.public_url + ("?<query>" if query else "")
            raise UpgradeRefused(f"{SIGNATURE_HEADER} does not match {url} (wrong auth token "
                                 "or server.public_url not exactly as in the TwiML?)")


class CallTokenCheck:
    """Checks the per-call token on `start`: a MAC of the CallSid, usable once.

    Memory is bounded: the last `remember` accepted CallSids are kept (oldest
    forgotten first), so a token replayed only after that many newer calls
    would pass again. First use wins: a replay that reaches agentd before the
    real stream takes the CallSid, and the real stream is then refused.
    """

    def __init__(self, *, param: str, secret: str, remember: int = DEFAULT_REMEMBERED_CALLS) -> None:
        if remember < 1:
            raise ValueError(f"remember: expected >= 1, got {remember}")
        self.param = param
        self._key = secret.encode()
        self._remember = remember
        self._seen: OrderedDict[str, None] = OrderedDict()

    def __repr__(self) -> str:
        return f"CallTokenCheck(param={self.param!r}, remembered={len(self._seen)}/{self._remember})"

    def check(self, start: twilio.Start) -> None:
        """Accept `start` (and remember its CallSid) or raise CallTokenError naming the problem."""
        field_name = f"start.customParameters.{self.param}"
        given = start.parameter(self.param)
        if not given:
            raise CallTokenError(f"{field_name}: call token missing")
        expected = hmac.new(self._key, start.call_sid.encode(), hashlib.sha256).hexdigest()
        if not same_secret(given.lower(), expected):  # case-insensitive hex
            raise CallTokenError(f"{field_name}: call token invalid for this callSid")
        if start.call_sid in self._seen:
            raise CallTokenError(f"{field_name}: call token already used (callSid seen before)")
        self._seen[start.call_sid] = None
        if len(self._seen) > self._remember:
            self._seen.popitem(last=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Gatekeeper:
    """The checks this daemon runs; None = that check is off."""

    signature: SignatureCheck | None = None
    call_token: CallTokenCheck | None = None

    @classmethod
    def from_config(cls, config: Config, env: Mapping[str, str] | None = None) -> Gatekeeper:
        """The checks `config` asks for, with secrets read via Config (env None: os.environ).

        Raises ConfigError, naming the key and the variable, when a check is
        configured but its secret is missing: fail closed. Logs what is on.
        """
        gate = cls(signature=_signature_check(config, env), call_token=_call_token_check(config, env))
        gate._log_state(config, env)
        return gate

    def verify_upgrade(self, headers: Iterable[tuple[str, str]], query: str = "") -> None:
        """Raise UpgradeRefused unless the upgrade (its headers, its URL's query string) may proceed."""
        if self.signature is not None:
            self.signature.verify(headers, query)

    def check_start(self, start: twilio.Start) -> None:
        """Raise CallTokenError unless the call may proceed past `start`."""
        if self.call_token is not None:
            self.call_token.check(start)

    def _log_state(self, config: Config, env: Mapping[str, str] | None) -> None:
        s = config.server
        if self.signature is not None:
            log.info("Twilio request validation on: x-twilio-signature checked for %s", s.public_url)
        elif config.twilio_auth_token(env):
            log.warning("%s is set but server.public_url is empty: x-twilio-signature is NOT checked",
                        s.auth_token_env)
        else:
            log.warning("Twilio request validation off (server.public_url empty): anyone who can reach "
                        "this port can open calls")
        if self.call_token is not None:
            log.info("per-call token on: <Parameter name=%r> checked on start", s.call_token_param)


def _signature_check(config: Config, env: Mapping[str, str] | None) -> SignatureCheck | None:
    s = config.server
    if not s.public_url:
        return None
    token = config.twilio_auth_token(env)
    if not token:
        raise ConfigError(f"server.public_url is set but the variable named by server.auth_token_env "
                          f"({s.auth_token_env}) is unset or empty; agentd will not serve unsigned calls. "
                          f"Set {s.auth_token_env} to the Twilio auth token, or clear server.public_url")
    return SignatureCheck.for_url(token, s.public_url)


def _call_token_check(config: Config, env: Mapping[str, str] | None) -> CallTokenCheck | None:
    s = config.server
    if not s.call_token_param:
        return None
    secret = config.call_token_secret(env)
    if not secret:
        raise ConfigError(f"server.call_token_param is set but the variable named by "
                          f"server.call_token_secret_env ({s.call_token_secret_env}) is unset or empty; "
                          f"set it to the secret the TwiML webhook uses, or clear server.call_token_param")
    return CallTokenCheck(param=s.call_token_param, secret=secret)
