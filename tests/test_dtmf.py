"""agentd.dtmf: keypad entries, ended by '#' or by the inter-digit timeout, with time passed in."""

import pytest

from agentd.dtmf import DigitCollector, digits_message


def test_hash_ends_the_entry_and_is_not_part_of_it():
    keys = DigitCollector(timeout_s=3.0)
    assert [keys.press(d, now=10.0 + i) for i, d in enumerate("12*4")] == [None] * 4
    assert keys.pending == "12*4"
    assert keys.press("#", now=14.0) == "12*4"
    assert keys.pending == "" and keys.deadline() is None


def test_the_deadline_is_a_query_that_moves_with_each_digit():
    keys = DigitCollector(timeout_s=3.0)
    assert keys.deadline() is None
    keys.press("4", now=10.0)
    assert keys.deadline() == 13.0
    keys.press("2", now=12.5)
    assert keys.deadline() == 15.5


def test_the_entry_completes_at_the_inter_digit_timeout_not_before():
    keys = DigitCollector(timeout_s=3.0)
    keys.press("7", now=1.0)
    keys.press("3", now=2.0)
    assert keys.expire(now=4.999) is None
    assert keys.expire(now=5.0) == "73"
    assert keys.expire(now=9.0) is None and keys.pending == ""


def test_a_stray_hash_completes_nothing_and_a_cleared_entry_is_gone():
    keys = DigitCollector(timeout_s=3.0)
    assert keys.press("#", now=1.0) is None
    keys.press("5", now=2.0)
    keys.clear()
    assert keys.expire(now=100.0) is None


def test_digits_become_a_user_message_containing_them():
    assert "0412" in digits_message("0412")


def test_a_timeout_must_be_positive():
    with pytest.raises(ValueError):
        DigitCollector(timeout_s=0)
