# Every target works on a fresh clone: the venv is created when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test check lint typecheck demo bench system-packages clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian packages the tests, the demo or the bench call (openssl, ip, stunnel).
system-packages:
	tools/ensure-debs openssl:openssl ip:iproute2

test: install system-packages
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check meshid ca sidecar tests bench tools
	$(BIN)/ruff format --check meshid ca sidecar tests bench tools

typecheck: install
	$(BIN)/mypy
	$(BIN)/mypy tools/demo.py

check: lint typecheck test

demo: install system-packages
	$(BIN)/python tools/demo.py

bench: install
	tools/ensure-debs openssl:openssl stunnel4:stunnel4 wrk:wrk iperf3:iperf3 nginx:nginx-light
	$(BIN)/python -m pip install --quiet py-spy || echo "bench: py-spy unavailable, no profiles" >&2
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache *.egg-info
