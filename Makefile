# Set-up and checks. `make demo` grades the bundled examples with the shipped model; `make test` runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
KLGRADE := $(VENV)/bin/klgrade

.PHONY: install demo test browser benchmarks

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(KLGRADE) predict examples --explain --out demo-out --format table

# The browser test drives Debian's Chromium through its ChromeDriver (no browser download).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

# One pytest-xdist worker per core, each computing on one thread (tests/conftest.py); `-n 0` runs in one process.
test: install browser
	$(PY) -m pytest -n auto --dist worksteal

benchmarks: install
	$(PY) benchmarks/data_loading.py
	$(PY) benchmarks/models.py
	$(PY) benchmarks/inference.py
