"""Prometheus metrics: what ``GET /metrics`` serves.

Theory of operation
-------------------
Nothing on a call's path calls into this module. The families come from three
places, each read where it already exists:

* **Records.** ``Metrics.observe`` is a ``Services.observers`` hook: every call
  and turn record the driver writes also counts calls, turns, fallbacks,
  dropped TX frames and feeds the V2V and stage histograms.
* **Server state, at scrape time.** Calls up now, refusals by reason and the
  drain flag are read off the ``Server`` when Prometheus asks (a custom
  collector), so refusal sites need no metric calls.
* **Upstream errors and LLM tokens.** The adapters translate foreign errors in one place
  each; that place calls ``count_upstream_error(service, kind)`` (and the LLM
  adapter ``count_tokens`` for the usage the server reports). Those counts
  are process-wide (one set of adapters per process); ``upstreams_failing``
  turns their recent rate into the "upstreams failing right now" that
  ``/readyz`` reports.

Family names and labels are a contract: dashboards and alerts are built on them.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "Metrics", "count_tokens", "count_upstream_error", "upstreams_failing"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Telemetry's stage names -> the names dashboards see (the LLM is a role, "ai" was the old word).
STAGE_LABELS: Mapping[str, str] = {
    "greeting": "greeting", "stt_partial": "stt_partial", "stt_final": "stt_final",
    "endpointing": "endpointing", "ai_ttft": "llm_ttft", "ai_sentence": "llm_sentence",
    "tts_ttfb": "tts_ttfb", "playout": "playout",
}
# Voice-to-voice: most turns should land between 0.5 s and 2 s, so the buckets are finest there.
V2V_BUCKETS_S = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0, 10.0)
STAGE_BUCKETS_S = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)

# An upstream with this many errors within the window is "failing right now" for /readyz.
FAILING_ERRORS = 3
FAILING_WINDOW_S = 30.0

_upstream_errors: collections.Counter[tuple[str, str]] = collections.Counter()
_tokens: collections.Counter[str] = collections.Counter()
# Trio-clock times of each service's last errors. Per Trio run: each run has its own clock.
_recent_errors: trio.lowlevel.RunVar[dict[str, collections.deque[float]]] = trio.lowlevel.RunVar("recent_errors")


def _recent() -> dict[str, collections.deque[float]]:
    try:
        return _recent_errors.get()
    except LookupError:
        _recent_errors.set(collections.defaultdict(lambda: collections.deque(maxlen=FAILING_ERRORS)))
        return _recent_errors.get()


def count_upstream_error(service: str, kind: str) -> None:
    """Count one failed upstream exchange: service "llm" | "stt" | "tts", kind such as "timeout".

    Called by each adapter where it translates a foreign error, just before raising.
    """
    _upstream_errors[service, kind] += 1
    _recent()[service].append(trio.current_time())


def count_tokens(usage: Mapping[str, int]) -> None:
    """Count an LLM response's token usage (the server's prompt_tokens and completion_tokens)."""
    for kind in ("prompt", "completion"):
        _tokens[kind] += usage.get(f"{kind}_tokens", 0)


def upstreams_failing(now: float) -> list[str]:
    """Services with FAILING_ERRORS errors within the last FAILING_WINDOW_S seconds, sorted."""
    return sorted(service for service, times in _recent().items()
                  if len(times) == FAILING_ERRORS and now - times[0] <= FAILING_WINDOW_S)


class ServerState(Protocol):
    """What the scrape reads off the server."""

    active_calls: int
    draining: bool
    refused: Mapping[str, int]


class Metrics:
    """One registry per server: the record-fed families plus a scrape-time collector."""

    def __init__(self, server: ServerState) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_ServerCollector(server))
        r = self.registry
        self.calls = Counter("agentd_calls_total", "Calls ended, by business and end reason",
                             ["business", "end_reason"], registry=r)
        self.turns = Counter("agentd_turns_total", "Caller turns answered (or attempted)", ["business"], registry=r)
        self.v2v = Histogram("agentd_turn_v2v_seconds", "Voice-to-voice: end of the caller's speech to "
                             "the first reply frame sent", buckets=V2V_BUCKETS_S, registry=r)
        self.stages = Histogram("agentd_stage_seconds", "Duration of each pipeline stage of a turn",
                                ["stage"], buckets=STAGE_BUCKETS_S, registry=r)
        self.fallbacks = Counter("agentd_fallbacks_total", "Degradations a turn took (filler, apology, ...)",
                                 ["kind"], registry=r)
        self.tx_dropped = Counter("agentd_tx_frames_dropped_total", "Outbound audio frames dropped "
                                  "because a call's TX queue was full", registry=r)

    def observe(self, record: Mapping[str, Any]) -> None:
        """A ``Services.observers`` hook: count one call or turn record."""
        if record.get("kind") == "call":
            self._observe_call(record)
        elif record.get("kind") == "turn":
            self._observe_turn(record)

    def render(self) -> bytes:
        """The Prometheus text exposition of every family."""
        return generate_latest(self.registry)

    def _observe_call(self, record: Mapping[str, Any]) -> None:
        self.calls.labels(business=record.get("business", ""), end_reason=record.get("end_reason", "")).inc()
        self.tx_dropped.inc(record.get("tx_drops", 0))
        greeting_ms = record.get("greeting", {}).get("stages_ms", {}).get("greeting")
        if greeting_ms is not None:
            self.stages.labels(stage="greeting").observe(greeting_ms / 1000)

    def _observe_turn(self, record: Mapping[str, Any]) -> None:
        self.turns.labels(business=record.get("business", "")).inc()
        for stage, ms in record.get("stages_ms", {}).items():
            if stage == "v2v":
                self.v2v.observe(ms / 1000)
            elif stage in STAGE_LABELS:
                self.stages.labels(stage=STAGE_LABELS[stage]).observe(ms / 1000)
        for kind in record.get("fallbacks", ()):
            self.fallbacks.labels(kind=kind).inc()


class _ServerCollector(Collector):
    """Families read at scrape time: the server's own state and the process-wide upstream errors."""

    def __init__(self, server: ServerState) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("agentd_calls_active", "Calls up now", value=self._server.active_calls)
        yield GaugeMetricFamily("agentd_draining", "1 while the daemon drains before exiting",
                                value=int(self._server.draining))
        refused = CounterMetricFamily("agentd_calls_refused", "Calls refused, by reason", labels=["reason"])
        for reason, count in sorted(self._server.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        errors = CounterMetricFamily("agentd_upstream_errors", "Failed exchanges with an upstream service",
                                     labels=["service", "kind"])
        for (service, kind), count in sorted(_upstream_errors.items()):
            errors.add_metric([service, kind], count)
        yield errors
        tokens = CounterMetricFamily("agentd_llm_tokens", "LLM tokens the server reported using",
                                     labels=["kind"])
        for kind in ("prompt", "completion"):
            tokens.add_metric([kind], _tokens[kind])
        yield tokens
