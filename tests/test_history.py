"""Specification of the conversation history the LLM sees (agentd/history.py)."""

from agentd.history import History
from agentd.tool_calls import ToolCall, assistant_tool_calls_message, tool_result_message


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

CALL = ToolCall(id="call_1", name="order_status", arguments={"order": "A7"}, arguments_json='{"order": "A7"}')
ROUND = (assistant_tool_calls_message("Let me look.", [CALL]), tool_result_message("call_1", '{"slot": "9"}'))


def test_a_tool_round_sits_between_the_turn_and_what_the_caller_heard_after_it():
    history = History().said_by_caller("where is my order").with_messages(ROUND).heard_by_caller("It ships today.")
    assert [m["role"] for m in history.messages] == ["user", "assistant", "tool", "assistant"]
    assert history.messages[1]["tool_calls"][0]["id"] == history.messages[2]["tool_call_id"] == "call_1"


def test_no_messages_leave_the_history_as_it_was():
    history = History().said_by_caller("hello")
    assert history.with_messages(()) is history


def test_the_recent_window_never_starts_with_a_result_whose_call_it_cut_off():
    history = History().said_by_caller("where is my order").with_messages(ROUND).heard_by_caller("It ships today.")
    assert [m["role"] for m in history.recent(1)] == ["assistant"], "the tool result went with its call"
    assert history.recent(2) == history.messages
