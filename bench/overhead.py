"""Where a turn's voice-to-voice time went: the agent-added overhead formula, pure.

A turn's V2V (softphone: the caller's last voiced frame -> the first agent frame
played) is a sum of waits. Some are policy (how long agentd must hear silence,
the breath), some are the services (STT, LLM, TTS), and the rest is what the
agent adds. All times in ms; stamps are agentd's, on its call clock:

    eot      = speech_end + required_silence_ms          end of the silence rule
    commit   = turn_committed        when agentd took the turn (its own stamp)
    stt_wait = max(0, commit - eot)  past the silence rule: waiting for the final (or its timeout)
    llm_wait = max(0, ai_first_sentence - commit)               if the turn adopted a draft ("hit")
             = TTFT + k / tokens_per_s                          otherwise (injected)
    tts_wait = TTS TTFB (injected)
    overhead = V2V - required_silence_ms - stt_wait - llm_wait - tts_wait - breath_ms

`k` is the number of tokens after the first that the LLM streams before
agentd's SentenceSplitter cuts the first speakable piece (tokens = words in
localcloud's rules engine): TTS cannot start before that piece exists, so that
streaming time is as much an injected delay as the TTFT.

A turn committed on a strong partial (no final wait) has stt_wait 0; one that
waited for a final, or for stt.final_timeout_ms, counts that wait as STT time.
Records written before the `turn_committed` stamp existed are estimated from
`final_text` instead:

    F        = final_text, if stamped in this turn (>= speech_start)
    stt_wait = 0 if F <= eot;  F - eot if eot < F <= eot + T;  T otherwise   (T = stt.final_timeout_ms)

`overhead` is then split three ways, so it can be acted on:

    softphone_side = V2V - agentd's own v2v stage (speech_end -> first reply frame sent):
                     the VAD's vs the softphone's end of speech, WebSocket transport, and
                     the softphone's 20 ms playback slots (audio arriving mid-slot waits 0-20 ms)
    service_extra  = what localcloud costs a bare client beyond the injected delays
                     (espeak-ng synthesis, its gRPC/HTTP servers): tts_measured - TTFB,
                     plus llm_measured - llm_injected for a turn that asked the LLM afresh
    internal       = overhead - softphone_side - service_extra: agentd's own code

and `internal` is located with three diagnostics from agentd's stages (each is
agentd's view of a step minus what a bare client needs for it):

    tts_excess     = tts_ttfb stage - tts_measured          the TTS request path
    llm_excess     = ai_sentence stage - llm_measured        the LLM request path (fresh replies)
    playout_excess = playout stage - breath_ms              audio ready -> first frame sent, beyond the breath
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bench.service_times import PhraseCosts


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnBudget:
    """One turn's V2V split into its parts (ms)."""

    v2v: float
    required_silence: float
    stt_wait: float
    llm_wait: float
    tts_wait: float
    breath: float
    overhead: float
    softphone_side: float
    service_extra: float
    internal: float
    commit_lag: float | None  # ai_start - commit for a fresh reply: checks the commit estimate
    tts_excess: float | None
    llm_excess: float | None
    playout_excess: float | None


class RecordError(ValueError):
    """A turn record lacks what the formula needs; the message names it."""


def stt_wait_ms(stamps: Mapping[str, float], eot: float, final_timeout_ms: float) -> float:
    """How long past the silence rule the turn waited for STT (see the module docstring)."""
    if "turn_committed" in stamps:
        return max(0.0, stamps["turn_committed"] - eot)
    final = stamps.get("final_text")
    if final is None or final < stamps["speech_start"]:  # none, or a late final of the turn before
        return final_timeout_ms
    if final <= eot:
        return 0.0
    if final <= eot + final_timeout_ms:
        return final - eot
    return final_timeout_ms


def turn_budget(v2v_ms: float, record: Mapping[str, Any], costs: PhraseCosts, *,
                final_timeout_ms: float, tts_ttfb_ms: float) -> TurnBudget:
    """Split one answered turn's softphone V2V using agentd's turn record. Raises RecordError."""
    stamps = record.get("stamps_ms", {})
    for name in ("speech_start", "speech_end", "ai_first_sentence"):
        if name not in stamps:
            raise RecordError(f"turn record has no {name} stamp")
    if "v2v" not in record.get("stages_ms", {}):
        raise RecordError("turn record has no v2v stage")
    silence = float(record.get("required_silence_ms", 0.0))
    eot = stamps["speech_end"] + silence
    stt = stt_wait_ms(stamps, eot, final_timeout_ms)
    commit = eot + stt
    hit = record.get("speculation") == "hit"
    llm = max(0.0, stamps["ai_first_sentence"] - commit) if hit else costs.llm_injected_ms
    breath = float(record.get("breath_ms", 0.0))
    overhead = v2v_ms - silence - stt - llm - tts_ttfb_ms - breath
    softphone_side = v2v_ms - record["stages_ms"]["v2v"]
    extra = (costs.tts_measured_ms - tts_ttfb_ms) + (0.0 if hit else costs.llm_measured_ms - costs.llm_injected_ms)
    lag = None if hit or "ai_start" not in stamps else stamps["ai_start"] - commit
    stages = record["stages_ms"]
    return TurnBudget(v2v=v2v_ms, required_silence=silence, stt_wait=stt, llm_wait=llm, tts_wait=tts_ttfb_ms,
                      breath=breath, overhead=overhead, softphone_side=softphone_side, service_extra=extra,
                      internal=overhead - softphone_side - extra, commit_lag=lag,
                      tts_excess=_minus(stages.get("tts_ttfb"), costs.tts_measured_ms),
                      llm_excess=None if hit else _minus(stages.get("ai_sentence"), costs.llm_measured_ms),
                      playout_excess=_minus(stages.get("playout"), breath))


def _minus(value: float | None, subtrahend: float) -> float | None:
    return None if value is None else value - subtrahend
