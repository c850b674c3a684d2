# `make demo` and `make test` work on a fresh machine with Python 3.11+: each builds .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch; an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
DEMO_DIR ?= demo_out
SFT_DIR ?= sft_out
PYTEST_ARGS ?= -n 2

.PHONY: demo sft-demo synth-demo test test-newest-jax bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[hf,test,data,train,eval,curate,synth,serve]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m phi_jax.demo --out $(DEMO_DIR)

# Instruction tuning on CPU: experiments/sft_tiny_cpu.gin on the built-in chat set, its export, a chat with it.
sft-demo: $(VENV)/.installed
	$(VENV)/bin/phi-jax train --gin_file=experiments/sft_tiny_cpu.gin --workdir=$(SFT_DIR)/run
	$(VENV)/bin/phi-jax export-hf $(SFT_DIR)/run $(SFT_DIR)/hf --overwrite
	$(VENV)/bin/phi-jax chat $(SFT_DIR)/run --max_new_tokens 64 --message "What is the sum of 12, 30, 7?" \
		--message "Why? Explain adding up a list of numbers."

# Synthetic textbooks end to end (experiments/synth_demo.sh): topics from the built-in web documents,
# generated with make demo's model (trained first if missing), prepared as `synthetic`, a tiny phi trained on it.
synth-demo: $(VENV)/.installed
	PY=$(PY) DEMO_DIR=$(DEMO_DIR) experiments/synth_demo.sh

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest $(PYTEST_ARGS) tests

# The core tests under the newest jax (0.11.x, Python 3.13) in a cached Debian chroot: needs root and
# debootstrap. See .ci/newest_jax.sh. Not part of `make test` or CI.
test-newest-jax:
	.ci/newest_jax.sh $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) bench/forward_backward.py
	$(PY) bench/train_step.py
	$(PY) bench/checkpoint.py --phi15_layers 2
	$(PY) bench/data_stream.py
	$(PY) bench/decode.py

clean:
	rm -rf $(VENV) $(DEMO_DIR)
