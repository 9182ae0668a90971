"""Adapters to the outside services: Google STT/TTS over gRPC, the OpenAI-compatible LLM, business tools."""
