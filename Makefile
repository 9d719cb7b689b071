# Quick start targets. Each one creates or reuses .venv (tools/setup_env.sh is idempotent).
PY := .venv/bin/python

.PHONY: env demo test bench
env:
	bash tools/setup_env.sh

demo: env
	$(PY) tools/demo.py $(ARGS)

test: env
	$(PY) -m pytest tests $(ARGS)

bench: env
	$(PY) tools/benchmark/speed_memory.py $(ARGS)
