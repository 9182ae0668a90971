"""Builders that bring a CallFSM into each state through real events.

Every builder drives the public ``handle`` API only (no private attributes),
asserts the state it promises, and leaves the call clock at ``now``: the last
event it fed happened at ``now``. Every FSM starts from the shipped settings
(``etc/agentd.toml``); keyword overrides change TurnSettings fields (plus
``rng``), e.g. ``speaking_fsm(now=20.0, barge_in_enabled=False)``.
"""

from __future__ import annotations

import dataclasses
import random
import typing

from agentd.config import load_config
from agentd.fsm import (
    AgentEnds, BeginPlayback, CallFSM, CallStarted, Event, Final, Hangup, KeyPressed, Partial, PlaybackDone, PlayGoodbye,
    ReplyAudioReady, ReplyQueued, SpeechEnded, SpeechStarted, StartReply, State, Tick, TurnSettings, WindDown,
)

#: The settings the daemon ships with: the repository's etc/agentd.toml, no environment.
DEFAULTS = TurnSettings.from_config(load_config(None, env={}))
RNG_SEED = 20240611

#: Every event type the FSM knows, read from the ``Event`` union so a new type
#: is walked by the table tests without editing them.
EVENT_TYPES: tuple[type, ...] = typing.get_args(Event)


def new_fsm(*, rng: random.Random | None = None, **settings) -> CallFSM:
    """A fresh FSM (GREETING, nothing played yet); ``rng`` defaults to ``Random(RNG_SEED)``."""
    return CallFSM(dataclasses.replace(DEFAULTS, **settings), rng=rng or random.Random(RNG_SEED))


def greeting_fsm(now: float = 0.0, **settings) -> CallFSM:
    """The greeting has been started at ``now``."""
    fsm = new_fsm(**settings)
    fsm.handle(CallStarted(at=now))
    assert fsm.state is State.GREETING
    return fsm


def refractory_fsm(now: float = 5.0, **settings) -> CallFSM:
    """The greeting finished playing at ``now``; the refractory window is open."""
    fsm = greeting_fsm(now=now - 3.0, **settings)
    fsm.handle(PlaybackDone(at=now, reply=0))
    assert fsm.state is State.REFRACTORY
    return fsm


def listening_fsm(now: float = 10.0, **settings) -> CallFSM:
    """The refractory window closed exactly at ``now``; no utterance is open."""
    refractory_s = settings.get("refractory_s", DEFAULTS.refractory_s)
    fsm = refractory_fsm(now=now - refractory_s, **settings)
    assert fsm.handle(Tick(at=now)) == []
    assert fsm.state is State.LISTENING
    assert fsm.next_deadline() == float("inf")
    return fsm


def finalizing_fsm(now: float = 12.0, partial: str = "what time do you", **settings) -> CallFSM:
    """End of turn was declared at ``now``; only a partial is in, so the FSM waits.

    The utterance ran from ``now - 1.5`` to ``now - 0.5`` (short silence rule).
    """
    fsm = listening_fsm(now=now - 2.0, **settings)
    fsm.handle(SpeechStarted(at=now - 1.5))
    fsm.handle(Partial(at=now - 0.7, text=partial, audio_end_at=now - 0.7))
    fsm.handle(SpeechEnded(at=now - 0.5))
    assert fsm.handle(Tick(at=now)) == []
    assert fsm.state is State.FINALIZING
    return fsm


def thinking_fsm(now: float = 14.0, text: str = "what time do you open", **settings) -> CallFSM:
    """Reply 1 was committed at ``now`` for ``text`` (speech ``now-1.5`` .. ``now-0.5``)."""
    fsm = listening_fsm(now=now - 2.0, **settings)
    fsm.handle(SpeechStarted(at=now - 1.5))
    fsm.handle(SpeechEnded(at=now - 0.5))
    fsm.handle(Final(at=now - 0.2, text=text, audio_end_at=now - 0.5))
    assert fsm.handle(Tick(at=now)) == [
        StartReply(reply=1, text=text, speech_start_at=now - 1.5, speech_end_at=now - 0.5)
    ]
    assert fsm.state is State.THINKING
    return fsm


def speaking_fsm(now: float = 16.0, **settings) -> CallFSM:
    """Reply 1 is playing; playback began (after the breath) shortly before ``now``."""
    fsm = thinking_fsm(now=now - 1.0, **settings)
    fsm.handle(ReplyAudioReady(at=now - 0.5, reply=1))
    assert fsm.next_deadline() <= now
    assert fsm.handle(Tick(at=now)) == [BeginPlayback(reply=1)]
    assert fsm.state is State.SPEAKING
    return fsm


def holding_fsm(now: float = 16.0, **settings) -> CallFSM:
    """Reply 1 is ready, but the caller started talking at ``now - 0.2`` and has not stopped."""
    fsm = thinking_fsm(now=now - 1.0, **settings)
    fsm.handle(ReplyAudioReady(at=now - 0.5, reply=1))
    fsm.handle(SpeechStarted(at=now - 0.2))
    assert fsm.next_deadline() <= now
    assert fsm.handle(Tick(at=now)) == []
    assert fsm.state is State.HOLDING
    return fsm


def closing_fsm(now: float = 18.0, **settings) -> CallFSM:
    """The agent started winding the call down at ``now``, while listening."""
    fsm = listening_fsm(now=now - 1.0, **settings)
    assert fsm.handle(WindDown(at=now, reason="idle caller")) == [PlayGoodbye()]
    assert fsm.state is State.CLOSING
    return fsm


def ended_fsm(now: float = 18.0, **settings) -> CallFSM:
    """The caller hung up at ``now`` while reply 1 was playing."""
    fsm = speaking_fsm(now=now - 1.0, **settings)
    fsm.handle(Hangup(at=now))
    assert fsm.state is State.ENDED
    return fsm


#: One builder per state, for tests that walk the whole table.
BUILDERS = {
    State.GREETING: greeting_fsm,
    State.REFRACTORY: refractory_fsm,
    State.LISTENING: listening_fsm,
    State.FINALIZING: finalizing_fsm,
    State.THINKING: thinking_fsm,
    State.HOLDING: holding_fsm,
    State.SPEAKING: speaking_fsm,
    State.CLOSING: closing_fsm,
    State.ENDED: ended_fsm,
}


def sample_event(event_type: type, at: float) -> Event:
    """A plausible instance of ``event_type`` at ``at`` (for table walks)."""
    if event_type in (Partial, Final):
        return event_type(at=at, text="hello there", audio_end_at=at)
    if event_type in (ReplyAudioReady, PlaybackDone):
        return event_type(at=at, reply=1)
    if event_type is ReplyQueued:
        return event_type(at=at, reply=1, playout_s=0.5)
    if event_type is WindDown:
        return event_type(at=at, reason="sample")
    if event_type is KeyPressed:
        return event_type(at=at, digit="5")
    if event_type is AgentEnds:
        return event_type(at=at, reply=1)
    return event_type(at=at)


def tick_until_quiet(fsm: CallFSM, until: float) -> list:
    """Tick at each deadline up to ``until`` (like a driver would); all actions, in order."""
    actions: list = []
    while fsm.next_deadline() <= until:
        actions += fsm.handle(Tick(at=fsm.next_deadline()))
    return actions


async def drive_under_trio_clock(fsm, script) -> list[tuple]:
    """A tiny driver like call.py's: the next event or the next deadline, whichever
    comes first, on the Trio clock (use with autojump_clock). Returns a log of
    (time, event name, actions, state) until the FSM reaches ENDED."""
    import trio

    log = []
    send, receive = trio.open_memory_channel(0)

    async def caller():
        async with send:
            for event in script:
                await trio.sleep_until(event.at)
                await send.send(event)

    async def driver():
        while fsm.state is not State.ENDED:
            with trio.move_on_at(fsm.next_deadline()):
                event = await receive.receive()
                log.append((trio.current_time(), type(event).__name__, fsm.handle(event), fsm.state))
                continue
            now = trio.current_time()
            log.append((now, "Tick", fsm.handle(Tick(at=now)), fsm.state))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            nursery.start_soon(driver)
    return log
