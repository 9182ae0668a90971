"""Errors typed by blame: who is at fault decides what happens to the call.

Adapters translate foreign exceptions (grpc.RpcError, httpx.HTTPError, ...)
into these once, at their edge; anything else is our own bug and propagates.
"""


class AgentdError(Exception):
    """Base of every error agentd raises on purpose."""


class ConfigError(AgentdError):
    """The configuration is invalid; the message names the key."""


class CallProtocolError(AgentdError):
    """The peer (Twilio side) sent something malformed; close that call."""


class UpstreamUnavailable(AgentdError):
    """A cloud service failed or is too slow; degrade the call, never hang it."""
