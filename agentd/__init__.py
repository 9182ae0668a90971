"""agentd: a telephone voice agent on Trio."""

__version__ = "0.1.0"
