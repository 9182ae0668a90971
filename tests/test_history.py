"""Specification of the conversation history the LLM sees (agentd/history.py)."""

from agentd.history import History


def turn(*pairs: tuple[str, str]) -> History:
    return History(tuple({"role": role, "content": text} for role, text in pairs))


def test_a_late_final_revises_the_answered_words():
    history = turn(("user", "what time do you open tomorrow"))
    revised = history.turn_revised("what time do you open tomorrow", "What time do you open tomorrow?")
    assert revised == turn(("user", "What time do you open tomorrow?"))


def test_a_revision_reaches_the_caller_turn_behind_the_reply_already_heard():
    history = turn(("user", "hi"), ("assistant", "Hello!"), ("user", "a table for two"), ("assistant", "Sure."))
    assert history.turn_revised("a table for two", "a table for two, please") == turn(
        ("user", "hi"), ("assistant", "Hello!"), ("user", "a table for two, please"), ("assistant", "Sure."))


def test_a_revision_of_words_no_longer_last_changes_nothing():
    """The turn was resumed and answered again: the old words are gone from history."""
    history = turn(("user", "a table for two tomorrow"))
    assert history.turn_revised("a table for two", "a table for two.") == history


def test_a_revision_of_an_empty_history_changes_nothing():
    assert History().turn_revised("hi", "Hi.") == History()
