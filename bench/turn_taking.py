"""``python -m bench.turn_taking``: does agentd wait for a caller who hesitates mid-sentence?

The caller speaks the hesitation corpus (bench/hesitations.py: English and
Hebrew turns with a 400-700 ms pause in the middle). Everything else is
bench.latency's harness: localcloud as a child process (script STT, espeak-ng
TTS, keyword LLM; injected LLM TTFT 350 ms at 60 tokens/s, TTS TTFB 120 ms,
STT finals held back 880 ms, Google-like, or 150 ms), agentd in this process
with the production config plus overrides, the softphone placing calls; the
same configurations (bench.latency.MATRIX). Per configuration it reports:

* talk-overs: turns where agent audio played before the caller's last voiced
  frame (the softphone's V2V of the turn is negative);
* half-answers: turns where a reply was built without the turn's last words
  (an agentd turn record of this caller turn whose transcript lacks its last
  two words, with reply audio sent to Twilio);
* garbled: turns where a reply with audio sent was built on other words than
  the caller's (words lost, repeated, or from another turn): not a target of
  the issue, but a reconciled transcript must come out equal;
* V2V p50/p95 on the complete turns (neither of the above);
* LLM calls per caller turn and tokens per caller turn (prompt words, reply
  words actually streamed: localcloud's counters), the cost of drafts.

Raw results go to var/bench/turn-taking-<time>.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from agentd.cli import setup_logging
from agentd.config import Config, load_config
from agentd.testbed.softphone import CallReport
from agentd.testbed.softphone.script import CallerTurn, TurnReport
from agentd.text import normalize_for_match
from bench import common, latency
from bench.common import fmt_p as _p
from bench.hesitations import CORPUS, Hesitation, caller_turns, script_lines

LAST_WORDS = 2  # a reply built on the turn must have heard its last two words
TARGET_V2V_P50_MS = 650  # issue 11, with 880 ms finals
_COUNTERS = ("chat_calls", "chat_prompt_tokens", "chat_tokens_sent")


# -- judging one caller turn ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnVerdict:
    """What happened on one caller turn of one call."""

    turn: int  # index in CORPUS
    answered: bool
    v2v_ms: int | None  # softphone: caller's last voiced frame -> first agent frame played
    talk_over: bool
    half_answers: int  # replies with audio sent that were built without the turn's last words
    garbled: int  # replies with audio sent built on other words than the turn's (lost, repeated, foreign)
    replies: int  # agentd turn records of this caller turn with reply audio sent

    @property
    def complete(self) -> bool:
        return self.answered and not self.talk_over and not self.half_answers


def owner(caller_text: str, corpus: Sequence[Hesitation]) -> int | None:
    """The corpus turn that shares the most words with an agentd transcript (None: no word in common)."""
    words = set(normalize_for_match(caller_text).split())
    shared = [len(words & set(turn.words())) for turn in corpus]
    best = max(shared, default=0)
    return shared.index(best) if best else None


def heard_the_end(caller_text: str, turn: Hesitation) -> bool:
    """Does the transcript a reply was built on hold the turn's last words, in order?"""
    words, tail = normalize_for_match(caller_text).split(), turn.words()[-LAST_WORDS:]
    return any(words[i:i + len(tail)] == tail for i in range(len(words) - len(tail) + 1))


def reply_sent(record: dict) -> bool:
    return "first_reply_frame_sent" in record.get("stamps_ms", {})


def judge_call(report: CallReport, records: list[dict], corpus: Sequence[Hesitation]) -> list[TurnVerdict]:
    """One verdict per caller turn the softphone spoke, from its report and agentd's turn records."""
    mine = [r for r in records if r.get("kind") == "turn" and r.get("call_sid") == report.call_sid and reply_sent(r)]
    by_turn: dict[int, list[dict]] = {}
    for record in mine:
        index = owner(record.get("caller_text") or "", corpus)
        if index is not None:
            by_turn.setdefault(index, []).append(record)
    return [verdict(index, spoken, by_turn.get(index, []), corpus[index])
            for index, spoken in enumerate(report.turns)]


def verdict(index: int, spoken: TurnReport, replies: list[dict], turn: Hesitation) -> TurnVerdict:
    texts = [r.get("caller_text") or "" for r in replies]
    return TurnVerdict(turn=index, answered=spoken.v2v_ms is not None, v2v_ms=spoken.v2v_ms,
                       talk_over=spoken.v2v_ms is not None and spoken.v2v_ms < 0,
                       half_answers=sum(not heard_the_end(text, turn) for text in texts),
                       garbled=sum(normalize_for_match(text).split() != turn.words() for text in texts),
                       replies=len(replies))


# -- running one configuration ------------------------------------------------------------------------------


def llm_counters(lc: common.LocalCloudProcess) -> dict[str, int]:
    """localcloud's chat counters now (GET /localcloud/stats)."""
    stats = httpx.get(lc.http_base_url.removesuffix("/v1") + "/localcloud/stats", timeout=10).json()
    return {name: stats[name] for name in _COUNTERS}


def run_one(args: argparse.Namespace, base: Config, lc: common.LocalCloudProcess, variant: latency.Variant,
            turns: list[CallerTurn]) -> dict:
    config = latency.variant_config(base, lc, variant)
    before = llm_counters(lc)
    run, background_pct = latency.run_calls(args, config, lc, variant, turns)
    after = llm_counters(lc)
    verdicts = [v for report in run.reports for v in judge_call(report, run.records, CORPUS)]
    return {
        "variant": asdict(variant), "name": variant.name, "calls": len(run.reports), "failed": run.failed,
        "background_pct": background_pct, "verdicts": [asdict(v) | {"complete": v.complete} for v in verdicts],
        "llm": {name: after[name] - before[name] for name in _COUNTERS}, "records": run.records,
    }


def summary(result: dict) -> dict:
    """The figures of one configuration (JSON-ready)."""
    verdicts = result["verdicts"]
    spoken = len(verdicts)
    complete = [v["v2v_ms"] for v in verdicts if v["complete"]]
    per_turn = {name: result["llm"][name] / spoken if spoken else None for name in _COUNTERS}
    return {"turns": spoken, "answered": sum(v["answered"] for v in verdicts),
            "talk_overs": sum(v["talk_over"] for v in verdicts),
            "half_answers": sum(bool(v["half_answers"]) for v in verdicts),
            "garbled": sum(bool(v["garbled"]) for v in verdicts),
            "complete": len(complete), "v2v_p50": common.percentile(complete, 50),
            "v2v_p95": common.percentile(complete, 95), "per_turn": per_turn}


# -- printing --------------------------------------------------------------------------------------------------


def print_result(result: dict) -> None:
    s = summary(result)
    per_turn = s["per_turn"]
    print(f"\n== {result['name']}: {result['calls']} calls, {s['answered']}/{s['turns']} turns answered, "
          f"{len(result['failed'])} calls failed; other processes used {result['background_pct']:.0f} % of a core")
    print(f"  talk-overs {s['talk_overs']}/{s['turns']}   half-answers {s['half_answers']}/{s['turns']}   "
          f"(targets 0 and 0); replies built on garbled words {s['garbled']}/{s['turns']}")
    print(f"  V2V on the {s['complete']} complete turns: p50 {common.fmt(s['v2v_p50'])} ms  "
          f"p95 {common.fmt(s['v2v_p95'])} ms")
    print(f"  LLM per caller turn: {common.fmt(per_turn['chat_calls'], 2)} calls, "
          f"{common.fmt(per_turn['chat_prompt_tokens'])} prompt tokens, "
          f"{common.fmt(per_turn['chat_tokens_sent'])} reply tokens streamed")
    for index, turn in enumerate(CORPUS):
        mine = [v for v in result["verdicts"] if v["turn"] == index]
        v2v = [v["v2v_ms"] for v in mine]
        print(f"    {turn.label[:58]:<58} pause {turn.pause_ms} final {'y' if turn.closes_result else 'n'}: "
              f"talk-over {sum(v['talk_over'] for v in mine)}/{len(mine)} "
              f"half {sum(bool(v['half_answers']) for v in mine)}/{len(mine)} "
              f"garbled {sum(bool(v['garbled']) for v in mine)}/{len(mine)} V2V p50 {_p(v2v, 50)}")
    for failure in result["failed"][:5]:
        print(f"  FAILED CALL: {failure}")
    if result["background_pct"] > latency.BACKGROUND_LIMIT_PCT:
        print(f"  WARNING: other processes used {result['background_pct']:.0f} % of a core: the V2V is not "
              "agentd's alone")


def markdown_table(results: list[dict]) -> str:
    """The rows for bench/RESULTS.md."""
    lines = ["| configuration | talk-overs | half-answers | garbled words | V2V p50 / p95 ms (complete turns) | "
             "LLM calls per turn | prompt / reply tokens per turn | other load |", "|---|---|---|---|---|---|---|---|"]
    for result in results:
        s, per_turn = summary(result), summary(result)["per_turn"]
        lines.append(
            f"| {result['name'].replace(' | ', ', ')} | {s['talk_overs']}/{s['turns']} | {s['half_answers']}/{s['turns']} | "
            f"{s['garbled']}/{s['turns']} | "
            f"{common.fmt(s['v2v_p50'])} / {common.fmt(s['v2v_p95'])} ({s['complete']} turns) | "
            f"{common.fmt(per_turn['chat_calls'], 2)} | {common.fmt(per_turn['chat_prompt_tokens'])} / "
            f"{common.fmt(per_turn['chat_tokens_sent'])} | {result['background_pct']:.0f} % |")
    return "\n".join(lines)


# -- the command ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.turn_taking", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 call per configuration, STT 880 only (~6 min)")
    latency.add_run_options(parser, "turn-taking", calls=3, parallel=2)
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.parallel = 1, 1
        args.only = args.only or "stt 880"
    return args


def run_matrix(args: argparse.Namespace, base: Config, turns: list[CallerTurn], out_dir: Path) -> list[dict]:
    variants = [v for v in latency.MATRIX if not args.only or args.only in v.name]
    results = []
    for stt in sorted({v.stt_final_ms for v in variants}, reverse=True):
        delays = common.Delays(stt_final_ms=stt)
        log_path = out_dir / f"turn-taking-localcloud-{stt}.log"
        with common.LocalCloudProcess(script_lines(CORPUS), delays, log_path=log_path) as lc:
            for variant in (v for v in variants if v.stt_final_ms == stt):
                run = functools.partial(run_one, args, base, lc, variant, turns)
                results.append(common.run_quietly(run, args, functools.partial(latency.disturbed, variant)))
                print_result(results[-1])
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    machine = common.machine_description()
    started = time.monotonic()
    out = latency.out_path(args, "turn-taking")
    print(f"bench.turn_taking on {common.format_machine(machine)}")
    print(f"injected: LLM TTFT 350 ms at 60 tokens/s, TTS TTFB 120 ms; STT final 880 / 150 ms; "
          f"{args.calls} calls x {len(CORPUS)} hesitating turns per configuration, <= {args.parallel} at once")
    with tempfile.TemporaryDirectory(prefix="bench-turn-taking-") as scratch:
        turns = caller_turns(CORPUS, scratch)
    results = run_matrix(args, load_config(args.config), turns, out.parent)
    print("\n" + markdown_table(results))
    print(f"\n{len(results)} configurations in {(time.monotonic() - started) / 60:.1f} min; JSON: {out}")
    out.write_text(json.dumps({"machine": machine, "args": vars(args) | {"out": str(out)},
                               "results": [r | {"summary": summary(r)} for r in results]}, indent=1, default=str))
    return 1 if any(r["failed"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
