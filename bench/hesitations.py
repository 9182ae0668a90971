"""The hesitation corpus: caller turns with a 400-700 ms pause in the middle, English and Hebrew.

Real callers stop mid-sentence to think ("I'd like to book a table ... for
four people tomorrow"). An agent that answers the first half has talked over
the caller or answered half a question, which is worse than answering late.
Each `Hesitation` is one caller turn: two halves, each spoken by espeak-ng
when the benchmark starts (no audio is committed), joined with exactly
`pause_ms` of digital silence between the last voiced frame of the first half
and the first voiced frame of the second (voiced: the softphone's -40 dBFS
rule). espeak-ng and agentd's own codecs make the audio; nothing else is
needed (sox is not: joining mu-law bytes is a concatenation).

Each half is paired with what localcloud's `script` STT engine returns for it,
as Google would transcribe it. The pause is longer than localcloud's segment
gap (300 ms), so every turn is two recognizer segments, and the corpus holds
both of Google's behaviours at such a pause:

* `closes_result=False`: the pause is too short to close a result. The
  partials grow through the first half, stop during the pause, and go on
  growing through the second half; one final comes at the end ("+ " lines of
  the script engine).
* `closes_result=True`: Google sends `is_final` for the first half (it closes
  a segment, not the caller's turn), then the second half is a new result.

The halves are chosen to cover the rules of `agentd.text.partial_strength`: a
first half that looks complete (a punctuated question, a long bare clause)
and one that ends on a word that leaves the phrase open (a preposition, a
Hebrew prefix word), in both languages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from agentd.testbed.softphone.caller_audio import DEFAULT_THRESHOLD_DBFS, last_voiced_offset_ms, load_caller_wav, synthesize_caller_turns
from agentd.codecs.mulaw import FRAME_BYTES, SAMPLE_RATE_HZ, silence, split_frames, ulaw_decode
from agentd.codecs.pcm import rms_dbfs
from agentd.testbed.localcloud.segmenter import EnergySegmenter, SegmentStarted
from agentd.testbed.localcloud.settings import LocalCloudSettings
from agentd.testbed.localcloud.stt_engines import CONTINUES
from agentd.testbed.softphone.script import CallerTurn
from agentd.text import normalize_for_match
from bench.common import Phrase

FRAME_MS = FRAME_BYTES * 1000 // SAMPLE_RATE_HZ
MIN_PAUSE_MS, MAX_PAUSE_MS = 400, 700


@dataclass(frozen=True, slots=True, kw_only=True)
class Hesitation:
    """One caller turn: `first`, a pause of `pause_ms`, then `second` (see the module docstring)."""

    language: str  # espeak-ng voice: "en-us" or "he"
    first: Phrase
    second: Phrase
    pause_ms: int
    closes_result: bool  # does the recognizer send a final for the first half?

    def __post_init__(self) -> None:
        if not MIN_PAUSE_MS <= self.pause_ms <= MAX_PAUSE_MS or self.pause_ms % FRAME_MS:
            raise ValueError(f"pause_ms must be a multiple of {FRAME_MS} in [{MIN_PAUSE_MS}, {MAX_PAUSE_MS}]")

    @property
    def label(self) -> str:
        return f"{self.first.spoken} ... {self.second.spoken}"

    def script_lines(self) -> tuple[str, str]:
        """The script engine's lines for the two segments of this turn."""
        second = self.second.script if self.closes_result else f"{CONTINUES} {self.second.script}"
        return self.first.script, second

    def words(self) -> list[str]:
        """The whole turn's words as agentd compares transcripts (`normalize_for_match`)."""
        return normalize_for_match(f"{self.first.script} {self.second.script}").split()


def _phrase(script: str) -> Phrase:
    """A half as transcribed; espeak-ng speaks it without the recognizer's sentence punctuation."""
    return Phrase(spoken=script.rstrip(".?!"), script=script)


# language, pause ms, does the first half get a final, first half and second half as transcribed
_TURNS = (
    ("en-us", 500, False, "I'd like to book a table", "for four people tomorrow."),
    ("en-us", 640, True, "What time do you open?", "On Saturday morning?"),  # a question of its own
    ("en-us", 580, False, "Can you send a plumber to look at", "the leaking pipe in my kitchen?"),  # preposition
    ("en-us", 420, True, "How much does it cost", "to replace a water heater?"),
    ("he", 500, False, "אני רוצה להזמין שולחן", "לארבעה אנשים מחר."),
    ("he", 680, True, "מתי אתם פותחים?", "ביום שישי בבוקר?"),  # a question of its own
    ("he", 600, False, "אני צריך אינסטלטור בשביל", "לתקן צינור שדולף במטבח."),  # preposition
    ("he", 440, True, "כמה עולה לתקן את הדוד", "ולהחליף את הברז?"),
)
CORPUS: tuple[Hesitation, ...] = tuple(
    Hesitation(language=language, pause_ms=pause_ms, closes_result=closes, first=_phrase(first), second=_phrase(second))
    for language, pause_ms, closes, first, second in _TURNS
)


def script_lines(corpus: Sequence[Hesitation]) -> list[str]:
    """Every turn's two script lines, in order: the script for localcloud."""
    return [line for turn in corpus for line in turn.script_lines()]


def first_voiced_offset_ms(mulaw: bytes, threshold_dbfs: float = DEFAULT_THRESHOLD_DBFS) -> int:
    """Offset (ms) of the first 20 ms frame louder than `threshold_dbfs`; the length if none is."""
    for index, frame in enumerate(split_frames(mulaw, pad=False)):
        if rms_dbfs(ulaw_decode(frame)) > threshold_dbfs:
            return index * FRAME_MS
    return len(mulaw) * 1000 // SAMPLE_RATE_HZ


def join_with_pause(first: bytes, second: bytes, pause_ms: int) -> bytes:
    """`first` up to its last voiced frame, `pause_ms` of silence, `second` from its first voiced frame."""
    end = last_voiced_offset_ms(first) * SAMPLE_RATE_HZ // 1000
    start = first_voiced_offset_ms(second) * SAMPLE_RATE_HZ // 1000
    return first[:end] + silence(pause_ms // FRAME_MS) + second[start:]


def recognizer_segments(mulaw: bytes) -> int:
    """How many segments localcloud's energy segmenter (default settings) finds in `mulaw`."""
    defaults = LocalCloudSettings()
    segmenter = EnergySegmenter(threshold_dbfs=defaults.stt_vad_threshold_dbfs, gap_ms=defaults.stt_segment_gap_ms)
    pcm = ulaw_decode(mulaw)
    frames = (pcm[i:i + FRAME_BYTES] for i in range(0, len(pcm) - FRAME_BYTES + 1, FRAME_BYTES))
    return sum(isinstance(segmenter.push(np.asarray(frame)), SegmentStarted) for frame in frames)


def caller_turns(corpus: Sequence[Hesitation], out_dir: str | Path) -> list[CallerTurn]:
    """Speak the corpus with espeak-ng into `out_dir`: one CallerTurn per Hesitation, labelled.

    Raises RuntimeError when a turn is not exactly two recognizer segments: its
    script lines would then be paired with the wrong audio.
    """
    turns = []
    for number, turn in enumerate(corpus, start=1):
        halves = synthesize_caller_turns([turn.first.spoken, turn.second.spoken], turn.language,
                                         out_dir=Path(out_dir) / f"hesitation_{number:02d}")
        audio = join_with_pause(*(load_caller_wav(path) for path in halves), turn.pause_ms)
        if (segments := recognizer_segments(audio)) != 2:
            raise RuntimeError(f"{turn.label!r}: {segments} recognizer segments, expected 2 (a pause inside a half?)")
        turns.append(replace(CallerTurn(audio=audio), label=turn.label))
    return turns
