"""Shared fixtures: real caller speech, localcloud, and a config pointed at it."""

from __future__ import annotations

import httpx
import pytest

from agentd.adapters.business_tools import BusinessTools
from agentd.testbed.softphone.caller_audio import synthesize_caller_turns
from agentd.config import load_config
from agentd.testbed.demo import demo_config
from agentd.testbed.localcloud import LocalCloud, settings_from_config
from agentd.testbed.softphone.script import CallerTurn
from tests.tool_server import ToolServer

HOURS_LINE = "what time do you open tomorrow"
BYE_LINE = "thanks goodbye"


@pytest.fixture(scope="session")
def caller(tmp_path_factory) -> dict[str, CallerTurn]:
    """Real speech for the caller's turns (localcloud's script engine decides the words)."""
    texts = {"hours": "What time do you open tomorrow?", "bye": "Thank you, goodbye."}
    paths = synthesize_caller_turns(list(texts.values()), "en-us", out_dir=tmp_path_factory.mktemp("caller"))
    return {key: CallerTurn.from_wav(path) for key, path in zip(texts, paths)}


@pytest.fixture
def base_config():
    # Short greetings keep the tests quick; everything else is the shipped config.
    return load_config(None).with_overrides(**{
        "businesses.acme.greeting": "Acme Plumbing, hello.",
        "businesses.default.greeting": "שלום.",
    })


@pytest.fixture
def cloud(base_config):
    settings = settings_from_config(base_config, stt_engine="script", script_lines=(HOURS_LINE, BYE_LINE))
    with LocalCloud(settings) as lc:
        yield lc


@pytest.fixture
def config(base_config, cloud, tmp_path):
    return demo_config(base_config, cloud, str(tmp_path / "telemetry"))


@pytest.fixture
def cloud_process(tmp_path):
    """localcloud as its own process (script STT engine, short injected delays), for tests whose agentd
    nodes are child processes too: the tests' own process then carries only the softphones."""
    from bench.common import Delays, LocalCloudProcess

    delays = Delays(stt_final_ms=100, llm_ttft_ms=100, tts_ttfb_ms=50)
    with LocalCloudProcess([HOURS_LINE, BYE_LINE], delays, log_path=tmp_path / "localcloud.log") as lc:
        yield lc


@pytest.fixture
async def tool_server(nursery) -> ToolServer:
    """A business-tool HTTP server on 127.0.0.1 (tests/tool_server.py), in the test's Trio loop."""
    srv = ToolServer()
    await nursery.start(srv.serve)
    return srv


@pytest.fixture
async def business_tools():
    """Business tools over a fresh pooled httpx client."""
    async with httpx.AsyncClient() as client:
        yield BusinessTools(client)
