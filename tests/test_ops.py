"""The ops listener over real sockets: /healthz, /readyz, /metrics (checked by promtool), the status page
(rendered by headless Chromium)."""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile

import httpx
import pytest
import trio
from agent_harness import turns_of, wait_for_call_record
from prometheus_client.parser import text_string_to_metric_families

from agentd.server import serve
from agentd.testbed.softphone import place_call

OPS_LIMIT_S = 90  # a guard against hangs, not a performance assertion
FAMILIES = {  # the contract of issue 9: name -> (type, labels)
    "agentd_calls_active": ("gauge", set()),
    "agentd_calls": ("counter", {"business", "end_reason"}),
    "agentd_calls_refused": ("counter", {"reason"}),
    "agentd_turns": ("counter", {"business"}),
    "agentd_turn_v2v_seconds": ("histogram", set()),
    "agentd_stage_seconds": ("histogram", {"stage"}),
    "agentd_upstream_errors": ("counter", {"service", "kind"}),
    "agentd_fallbacks": ("counter", {"kind"}),
    "agentd_tx_frames_dropped": ("counter", set()),
    "agentd_draining": ("gauge", set()),
    "agentd_llm_tokens": ("counter", {"kind"}),
}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROMTOOL = shutil.which("promtool")


async def get(server, path: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(f"http://127.0.0.1:{server.ops_port}{path}")


async def test_readyz_is_503_until_the_greetings_are_cached(config):
    unreachable = config.with_overrides(**{"tts.endpoint": "127.0.0.1:9", "tts.timeout_ms": 300})
    with trio.fail_after(OPS_LIMIT_S):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, unreachable)
            health, ready = await get(server, "/healthz"), await get(server, "/readyz")
            nursery.cancel_scope.cancel()
    assert health.status_code == 200
    assert ready.status_code == 503
    assert ready.json() == {"ready": False, "reasons": ["greetings not cached yet", "tts failing"]}


async def test_readyz_is_200_when_ready_and_503_while_draining(config):
    with trio.fail_after(OPS_LIMIT_S):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, config)
            ready = await get(server, "/readyz")
            server.draining = True
            draining = await get(server, "/readyz")
            nursery.cancel_scope.cancel()
    assert (ready.status_code, ready.json()) == (200, {"ready": True, "reasons": []})
    assert (draining.status_code, draining.json()["reasons"]) == (503, ["draining"])


async def test_unknown_paths_and_methods_are_refused(config):
    with trio.fail_after(OPS_LIMIT_S):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, config)
            async with httpx.AsyncClient() as client:
                missing = await client.get(f"http://127.0.0.1:{server.ops_port}/nope")
                posted = await client.post(f"http://127.0.0.1:{server.ops_port}/readyz")
            nursery.cancel_scope.cancel()
    assert (missing.status_code, posted.status_code) == (404, 405)


async def after_one_call(config, caller, records: list[dict], look) -> object:
    """Serve, place one two-turn call to acme, then return ``await look(server, call_sid)``."""
    with trio.fail_after(OPS_LIMIT_S):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(functools.partial(serve, config, observers=[records.append]))
            url = f"ws://127.0.0.1:{server.port}{config.server.path}"
            report = await place_call(url, [caller["hours"], caller["bye"]], business="acme")
            await wait_for_call_record(records, report.call_sid)
            result = await look(server, report.call_sid)
            nursery.cancel_scope.cancel()
    return result


async def test_metrics_count_the_call_and_its_turns_in_the_named_families(config, caller):
    records: list[dict] = []

    async def scrape(server, _sid):
        server.refused["busy"] += 2  # as the front door counts a refusal
        return await get(server, "/metrics")

    response = await after_one_call(config, caller, records, scrape)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for name, (kind, labels) in FAMILIES.items():
        assert families[name].type == kind, name
        for sample in families[name].samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)

    def value(family: str, sample: str, **labels: str) -> float:
        return sum(s.value for s in families[family].samples
                   if s.name == sample and labels.items() <= s.labels.items())

    turns = [r for r in records if r["kind"] == "turn"]
    # The caller's last turn is a goodbye, on which the model ends the call.
    assert value("agentd_calls", "agentd_calls_total", business="acme", end_reason="agent hung up") == 1
    assert value("agentd_turns", "agentd_turns_total", business="acme") == len(turns) == 2
    assert value("agentd_turn_v2v_seconds", "agentd_turn_v2v_seconds_count") == 2
    v2v_sum = sum(t["stages_ms"]["v2v"] for t in turns) / 1000
    assert value("agentd_turn_v2v_seconds", "agentd_turn_v2v_seconds_sum") == pytest.approx(v2v_sum)
    assert value("agentd_stage_seconds", "agentd_stage_seconds_count", stage="llm_ttft") == 2
    assert value("agentd_stage_seconds", "agentd_stage_seconds_count", stage="greeting") == 1
    assert value("agentd_calls_refused", "agentd_calls_refused_total", reason="busy") == 2
    assert value("agentd_calls_active", "agentd_calls_active") == 0
    assert value("agentd_draining", "agentd_draining") == 0
    assert value("agentd_llm_tokens", "agentd_llm_tokens_total", kind="completion") > 0, "localcloud reports usage"


@pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: scripts/install.sh installs Debian's prometheus")
async def test_promtool_accepts_the_metrics(config, caller):
    response = await after_one_call(config, caller, [], lambda server, _sid: get(server, "/metrics"))
    checked = subprocess.run([PROMTOOL, "check", "metrics"], input=response.content, capture_output=True,
                             timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == b"", "no lint warnings either"


def chromium(*args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with a throw-away profile, nothing fetched but the page."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               "--no-first-run", f"--user-data-dir={profile}", *args],
                              capture_output=True, timeout=120, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium missing: scripts/install.sh installs Debian's chromium")
async def test_status_page_shows_calls_turns_and_state_in_chromium(config, caller, tmp_path):
    """A call in progress, the turns before it: the page Chromium renders shows both."""
    records: list[dict] = []
    screenshot = tmp_path / "status.png"
    with trio.fail_after(OPS_LIMIT_S * 2):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(functools.partial(serve, config, observers=[records.append]))
            url = f"ws://127.0.0.1:{server.port}{config.server.path}"
            first = await place_call(url, [caller["hours"], caller["bye"]], business="acme")
            await wait_for_call_record(records, first.call_sid)
            nursery.start_soon(functools.partial(place_call, url, [caller["hours"]] * 8, business="acme"))
            while not any(call.states for call in server.calls):  # up, past its greeting
                await trio.sleep(0.05)
            page = f"http://127.0.0.1:{server.ops_port}/"
            dom = await trio.to_thread.run_sync(chromium, "--dump-dom", page)
            shot = await trio.to_thread.run_sync(chromium, f"--screenshot={screenshot}", "--window-size=900,700",
                                                 page)
            nursery.cancel_scope.cancel()
    html = dom.stdout.decode()
    assert dom.returncode == 0 and shot.returncode == 0, shot.stderr
    assert "<h1>agentd</h1>" in html and ">ready<" in html
    assert "Calls up now" in html and "<td>acme</td>" in html, "the live call's business"
    assert html.count("<rect") >= 2 * 4, "a stage waterfall for each of the first call's turns"
    assert all(f"#{t['turn']}" in html for t in turns_of(records, first.call_sid))
    assert screenshot.stat().st_size > 10_000, "a real picture, not a blank page"
