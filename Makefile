# The two commands of the README. Both install what they need first.
.PHONY: demo test install

install:
	@scripts/install.sh

demo:
	@scripts/install.sh localcloud
	.venv/bin/agentd demo

# Four workers on any machine, even a 2-core one: most tests spend their time waiting on real-time
# calls (20 ms frames, greetings, replies), not on the CPU. worksteal: one 70 s test or a slow file
# does not leave the other workers idle.
test: install
	.venv/bin/python -m pytest -q -n 4 --dist worksteal
