"""The other side, for demos, tests and benchmarks: localcloud (Google and OpenAI on 127.0.0.1),
the softphone (Twilio and the caller) and the demo that puts them together. agentd serve never imports it."""
