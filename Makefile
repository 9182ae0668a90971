# The two commands of the README. Both install what they need first.
.PHONY: demo test install

install:
	@scripts/install.sh

demo:
	@scripts/install.sh localcloud
	.venv/bin/agentd demo

test: install
	.venv/bin/python -m pytest -q
