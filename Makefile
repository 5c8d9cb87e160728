# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv and install everything on first use.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# The CPU build of torch lies on this machine kind's disk; installing it first keeps pip
# from pulling a multi-GB CUDA build for the `torch>=2.2` requirement. Override on GPU hosts.
TORCH ?= torch==2.13.0
EXTRAS ?= dev

.PHONY: demo test install bench clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/lifelong demo $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q $(ARGS)

bench: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,bench]"

clean:
	rm -rf $(VENV) build *.egg-info
