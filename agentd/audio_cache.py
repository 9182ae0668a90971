"""Per-business audio synthesized once at startup and held in memory as frames.

The greeting must start within milliseconds of Twilio's ``start``, and the
apology must play even when the LLM or TTS is down, so both are synthesized
ahead (concurrently, at startup) and never touch the disk. A phrase that
could not be synthesized at startup is retried the first time a call asks.
"""

from __future__ import annotations

import logging

import trio

from agentd.codecs import mulaw
from agentd.errors import UpstreamUnavailable
from agentd.reply import Piece
from agentd.adapters.tts_google import Synthesizer, Voice

log = logging.getLogger(__name__)


class AudioCache:
    """Phrase audio keyed by (voice, text)."""

    def __init__(self, tts: Synthesizer):
        self._tts = tts
        self._pieces: dict[tuple[Voice, str], Piece] = {}

    def get(self, voice: Voice, text: str) -> Piece | None:
        """The cached piece, or None if it was never synthesized."""
        return self._pieces.get((voice, text))

    async def ensure(self, voice: Voice, text: str) -> Piece | None:
        """The piece, synthesizing it now if needed; None if TTS is unavailable."""
        piece = self.get(voice, text)
        if piece is not None or not text.strip():
            return piece
        try:
            audio = await self._tts.synthesize(text, voice)
        except UpstreamUnavailable as exc:
            log.warning("could not pre-synthesize %r: %s", text[:40], exc)
            return None
        piece = Piece(text, tuple(mulaw.split_frames(audio)))
        self._pieces[voice, text] = piece
        return piece

    async def warm(self, phrases: list[tuple[Voice, str]]) -> int:
        """Synthesize every phrase concurrently; returns how many are cached."""
        async with trio.open_nursery() as nursery:
            for voice, text in phrases:
                nursery.start_soon(self.ensure, voice, text)
        return sum(1 for voice, text in phrases if self.get(voice, text) is not None)
