"""The configuration agentd ships with (the repository's etc/agentd.toml, no
environment), for tests that build one component's settings from it and change
one thing with ``dataclasses.replace``."""

from __future__ import annotations

from agentd.config import load_config

SHIPPED = load_config(None, env={})
