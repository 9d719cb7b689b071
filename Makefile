# Quick start targets. Each one creates or reuses .venv (tools/setup_env.sh is idempotent).
PY := .venv/bin/python
# The oldest supported stack (Python 3.8, torch 2.0.1; tools/setup_env_oldest.sh), in .venv-py38.
PY_OLDEST := .venv-py38/bin/python
# What CI runs in the oldest stack: layer math, convert/merge, hook, checkpoint safety, the
# mmdet and mmseg pipelines end to end (mim train included), the version check, partial
# installs, install hygiene, and the layer under AMP and step sharing.
CORE_TESTS := tests/test_refocus.py tests/test_refconv_layer.py tests/test_convert.py \
	tests/test_merge.py tests/test_hook.py tests/test_checkpoint.py tests/test_pipeline_e2e.py \
	tests/test_compat.py tests/test_partial_installs.py tests/test_install.py \
	tests/test_amp_layer.py tests/test_step_sharing.py

.PHONY: env demo test bench env-oldest test-oldest
env:
	bash tools/setup_env.sh

demo: env
	$(PY) tools/demo.py $(ARGS)

test: env
	$(PY) -m pytest tests $(ARGS)

bench: env
	$(PY) tools/benchmark/speed_memory.py $(ARGS)

env-oldest:
	bash tools/setup_env_oldest.sh

test-oldest: env-oldest
	$(PY_OLDEST) -m pytest $(CORE_TESTS) $(ARGS)
