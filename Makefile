# topoxr: two commands for a new user, `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.topoxr-installed

.PHONY: demo test bench docs clean install

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=25.1"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[all]" --group test --group docs
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/topoxr demo --out demo-output

test: $(STAMP)
	bash scripts/ensure-chromium.sh
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m benchmarks

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) demo-output docs/_build
