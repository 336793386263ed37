# Two entry points: `make demo` and `make test`. Both set up .venv first.
# On a CPU machine the venv gets the pinned CPU wheel of torch (an unpinned torch would pull a
# multi-GB CUDA build): from pip's configured sources if they hold it, else from PyTorch's CPU
# index (PyPI itself has only the CUDA build of Linux torch). Inside an NGC container (torch already importable by the system python)
# the venv sees the container's packages and keeps its torch, megatron-core, TE and Apex.
PYTHON ?= python3
VENV ?= .venv
VENV_PY := $(VENV)/bin/python
# Linux's CPU wheel carries the +cpu tag (its untagged PyPI build is the CUDA one); macOS's has none
TORCH_CPU_PIN ?= torch==2.13.0$(if $(filter Linux,$(shell uname -s)),+cpu,)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: setup test demo demo-onpolicy clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	@if $(PYTHON) -c "import torch, megatron.core" >/dev/null 2>&1; then \
	  echo "[setup] container torch/megatron-core found: reusing them"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV) && \
	  $(VENV_PY) -m pip install -q --no-deps -e . && \
	  $(VENV_PY) -m pip install -q transformers datasets safetensors psutil einops matplotlib "pytest>=7" "trl==1.16.0" scipy \
	    "fschat==0.2.36" anthropic "alpaca-eval==0.6.6" "setuptools<81"; \
	else \
	  echo "[setup] CPU environment: $(TORCH_CPU_PIN) + megatron-core"; \
	  $(PYTHON) -m venv $(VENV) && \
	  $(VENV_PY) -m pip install -q --upgrade pip && \
	  { $(VENV_PY) -m pip install -q "$(TORCH_CPU_PIN)" 2>/dev/null || \
	    $(VENV_PY) -m pip install -q --index-url "$(TORCH_CPU_INDEX)" "$(TORCH_CPU_PIN)"; } && \
	  $(VENV_PY) -m pip install -q -e ".[test,eval-test]" && \
	  { ! $(VENV_PY) -c "import megatron.core" 2>&1 | grep -q "No module named 'triton'" || \
	    { echo "[setup] this megatron-core (>= 0.18, Python >= 3.12) imports triton, which PyTorch's CPU wheel lacks: installing it"; \
	      $(VENV_PY) -m pip install -q triton; }; }; \
	fi
	touch $@

test: setup
	$(VENV_PY) -m pytest -q $(PYTEST_ARGS) tests

# The demo starts afresh each time: --overwrite replaces the previous demo run's checkpoints
# and metrics in outputs/demo (the tiny default's assets there stay).
demo: setup
	MODEL=tiny PYTHON=$(abspath $(VENV_PY)) bash examples/train_simpo_llama3.sh --overwrite
	$(VENV_PY) tools/analyze_run.py outputs/demo

# On-policy rounds on the same task (examples/iterative_simpo.sh, MODEL=tiny): a short warm-up,
# then each round samples its prompts with the model so far, scores the answers by the letters
# they get right (megatron_simpo.model.tiny:letters_correct) and trains one epoch on best vs
# worst; the reward per round is tabled and plotted in outputs/demo-onpolicy/analysis.
demo-onpolicy: setup
	MODEL=tiny PYTHON=$(abspath $(VENV_PY)) bash examples/iterative_simpo.sh --rounds 3 --overwrite

clean:
	rm -rf $(VENV) outputs .pytest_cache
