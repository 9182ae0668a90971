"""bench.overhead's STT wait: from agentd's own commit stamp, or estimated for older records."""

from __future__ import annotations

from bench.overhead import stt_wait_ms

EOT = 1000.0  # ms: end of the silence rule
T = 320.0  # stt.final_timeout_ms


def test_a_turn_committed_at_the_silence_rule_waited_nothing_for_stt():
    # An immediate commit on a strong partial: no final, yet no final timeout was waited out.
    assert stt_wait_ms({"speech_start": 0.0, "turn_committed": EOT}, EOT, T) == 0.0


def test_a_turn_committed_after_the_silence_rule_waited_the_difference():
    stamps = {"speech_start": 0.0, "final_text": EOT + 150, "turn_committed": EOT + 152}
    assert stt_wait_ms(stamps, EOT, T) == 152.0


def test_records_without_the_commit_stamp_are_estimated_from_the_final():
    assert stt_wait_ms({"speech_start": 0.0, "final_text": EOT - 10}, EOT, T) == 0.0
    assert stt_wait_ms({"speech_start": 0.0, "final_text": EOT + 100}, EOT, T) == 100.0
    assert stt_wait_ms({"speech_start": 0.0}, EOT, T) == T
    assert stt_wait_ms({"speech_start": 0.0, "final_text": EOT + 900}, EOT, T) == T
