# topoxr: two commands for a new user, `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.topoxr-installed

MIN_VENV := .venv-min

.PHONY: demo test test-min bench docs clean install

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

# The core dependencies and every extra but torch at their declared floors
# (scripts/min_versions.py): each of those floors in pyproject.toml is a release the suite
# passed with. Tests that need torch, Chromium's driver (playwright) or sphinx skip.
test-min:
	test -x $(MIN_VENV)/bin/python || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install --quiet --upgrade "pip>=25.1"
	$(MIN_VENV)/bin/python scripts/min_versions.py --extras viz umap distributed keras fast > $(MIN_VENV)/floors.txt
	$(MIN_VENV)/bin/python -m pip install --quiet --only-binary=:all: -r $(MIN_VENV)/floors.txt \
		"pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6.100" "psutil>=5.9"
	$(MIN_VENV)/bin/python -m pip install --quiet --no-deps -e .
	$(MIN_VENV)/bin/python -m pip check
	$(MIN_VENV)/bin/python -m pytest

bench: $(STAMP)
	$(PY) -m benchmarks

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) $(MIN_VENV) demo-output docs/_build
