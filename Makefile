# The two commands of the README. Both install what they need first.
.PHONY: demo test install

install:
	@scripts/install.sh

demo: install
	.venv/bin/agentd demo

test: install
	.venv/bin/python -m pytest -q
