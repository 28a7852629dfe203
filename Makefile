# Two commands on a fresh machine:  `make run`  (the main job, local Ray)  and  `make test`.
# Both create and fill .venv when it is missing or older than the install files.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU build pinned for this kind of machine; ROCm users: see README "Installing on ROCm".
TORCH_SPEC ?= torch==2.13.0
NORSE_SPEC ?= norse==1.1.0
RUN_ARGS ?= --pop 32

.PHONY: venv run test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q --no-deps "$(NORSE_SPEC)"
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

run: venv
	$(PY) -m population.run $(RUN_ARGS)

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) -m benchmarks --json benchmarks/last.json

clean:
	rm -rf $(VENV) .pytest_cache
