"""Per-phrase constants for the latency budget: what the services cost a bare client, and the VAD offset.

For each caller phrase the `acme` rules engine picks a reply; agentd's
SentenceSplitter decides when the reply's first speakable piece is complete,
and TTS can start only then. This module works out, per phrase:

* `llm_injected_ms`: TTFT + k / tokens_per_s, k = tokens streamed after the
  first until the first piece is cut (the injected LLM delay on the path);
* `llm_measured_ms`: the same moment as a bare httpx client sees it from
  localcloud (injected delay + localcloud's HTTP/asyncio cost);
* `tts_measured_ms`: a bare gRPC client's SynthesizeSpeech round trip for
  the first piece (injected TTFB + espeak-ng + localcloud's gRPC cost);
* `endpoint_offset_ms`: agentd's VAD end of speech minus the softphone's
  (-40 dBFS) one, for the phrase's audio after two seconds of line silence.

Measured values are medians of a few calls made while nothing else runs.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

import grpc
import httpx

from agentd.codecs.mulaw import silence, split_frames
from agentd.config import Config
from agentd.adapters.llm_openai import build_messages
from agentd.testbed.localcloud.chat import rules_answer, tokens
from agentd.testbed.softphone.script import CallerTurn
from agentd.text import SentenceSplitter
from agentd.adapters.tts_google import Voice, synthesize_request
from agentd.vad import VadSettings, VoiceActivity, VoiceEnded
from bench import common

_TTS_METHOD = "/google.cloud.texttospeech.v1.TextToSpeech/SynthesizeSpeech"
REPEATS = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class PhraseCosts:
    """Per-phrase constants (ms); see the module docstring."""

    first_piece: str
    llm_injected_ms: float
    llm_measured_ms: float
    tts_measured_ms: float
    endpoint_offset_ms: float


def first_piece(reply: str, first_clause_min_chars: int) -> tuple[str, int]:
    """The reply's first speakable piece, and how many tokens after the first it waits for."""
    splitter = SentenceSplitter(first_clause_min_chars=first_clause_min_chars)
    words = tokens(reply)
    for index, token in enumerate(words):
        pieces = splitter.push(token)
        if pieces:
            return pieces[0], index
    return splitter.flush()[0], len(words) - 1


def _median_ms(measure, repeats: int = REPEATS) -> float:
    measure()  # warm-up: connections, page cache, espeak-ng data files
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        measure()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def bare_tts_ms(grpc_target: str, text: str, voice: Voice) -> float:
    """Median SynthesizeSpeech round trip for `text` from a plain synchronous gRPC client."""
    with grpc.insecure_channel(grpc_target) as channel:
        call = channel.unary_unary(_TTS_METHOD)  # bytes in, bytes out
        request = synthesize_request(text, voice)
        return _median_ms(lambda: call(request, timeout=10))


def bare_llm_ms(base_url: str, model: str, messages: list[dict], tokens_wanted: int) -> float:
    """Median time from POST to the `tokens_wanted`-th content delta, from a plain httpx client (kept alive)."""
    body = {"model": model, "messages": messages, "stream": True}
    with httpx.Client(timeout=10) as client:
        def until_token() -> None:
            seen = 0
            with client.stream("POST", f"{base_url}/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        seen += bool(json.loads(line[6:])["choices"][0]["delta"].get("content"))
                        if seen >= tokens_wanted:
                            return

        return _median_ms(until_token)


def endpoint_offset_ms(turn: CallerTurn, config: Config) -> float:
    """agentd's VAD end of speech minus the softphone's, for `turn` after 2 s of line silence."""
    vad = VoiceActivity(VadSettings.from_config(config))
    lead_frames = 100
    ended = None
    for index, frame in enumerate(split_frames(silence(lead_frames) + turn.audio + silence(50))):
        for event in vad.feed(frame, index * 0.02):
            if isinstance(event, VoiceEnded):
                ended = event.at
    if ended is None:
        raise RuntimeError(f"agentd's VAD never heard the end of {turn.label!r}")
    return (ended - lead_frames * 0.02) * 1000 - turn.speech_end_offset_ms


def phrase_costs(config: Config, phrase: common.Phrase, turn: CallerTurn, lc: common.LocalCloudProcess,
                 delays: common.Delays) -> PhraseCosts:
    """Work out (and measure against the running localcloud `lc`) one phrase's constants."""
    business = config.business(common.BUSINESS)
    messages = build_messages(business.system_prompt, [], phrase.script)
    reply = rules_answer(messages, config.businesses, offers_tools=False).text
    piece, k = first_piece(reply, config.llm.first_clause_min_chars)
    voice = Voice(language=business.language, name=business.voice, speaking_rate=config.tts.speaking_rate)
    return PhraseCosts(
        first_piece=piece,
        llm_injected_ms=delays.llm_ttft_ms + k * 1000 / delays.llm_tokens_per_s,
        llm_measured_ms=bare_llm_ms(lc.http_base_url, config.llm.model, messages, k + 1),
        tts_measured_ms=bare_tts_ms(lc.grpc_target, piece, voice),
        endpoint_offset_ms=endpoint_offset_ms(turn, config))
