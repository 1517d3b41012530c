# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv and install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-fast lint format system-deps train-compose clean

DEMO_STAMP := $(VENV)/.installed-runtime-stamp
PIP_INSTALL := $(PY) -m pip install -q --disable-pip-version-check --no-compile
# pip would byte-compile one module at a time; compileall uses every core and skips the packages' own test suites.
# Without .pyc files every Ray worker, Serve replica and test process compiles torch, ray and mlflow from source again
# wherever PYTHONDONTWRITEBYTECODE is set (benchmarks/RESULTS.md has the cost). Some packages ship Python 2 templates
# that never compile and are never imported, hence -qq and `|| true`.
COMPILE = $(PY) -m compileall -qq -j0 -x '/tests?/' "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
	>/dev/null || true

# pip's own output (its warnings about other packages' pins included) goes to a file; a failure shows its end.
INSTALL_LOG := $(VENV)/install.log
define install_into_venv
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing $(1) into $(VENV) (a few minutes the first time; pip's output: $(INSTALL_LOG))"
	@$(PIP_INSTALL) -e "$(1)" >$(INSTALL_LOG) 2>&1 || { tail -n 30 $(INSTALL_LOG); exit 1; }
	@$(COMPILE)
endef

# Each stamp reinstalls only when pyproject.toml changed, so a second `make test` or `make demo` starts at once.
# The demo needs only the runtime dependencies; the tests add the dev extra (which covers the demo's too).
$(DEMO_STAMP): pyproject.toml
	$(call install_into_venv,.)
	@touch $@

$(STAMP): pyproject.toml
	$(call install_into_venv,.[dev])
	@touch $@ $(DEMO_STAMP)

install: $(STAMP)

demo: $(if $(wildcard $(STAMP)),$(STAMP),$(DEMO_STAMP))
	$(VENV)/bin/aipd demo $(DEMO_ARGS)

# Real peers for the integration tests: a browser for the UI, Prometheus and Alertmanager for the metrics and alerts,
# Redis for the shared answer cache, libturbojpeg for a decoder with nvJPEG's chroma (tests/turbojpeg.py). Where they
# cannot be installed, the tests that need them skip and say why.
SYSTEM_DEPS := chromium prometheus prometheus-alertmanager redis-server libturbojpeg0
system-deps:
	@if command -v chromium >/dev/null && command -v promtool >/dev/null && command -v prometheus-alertmanager >/dev/null \
		&& command -v redis-server >/dev/null && /sbin/ldconfig -p | grep -q libturbojpeg; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			$(SYSTEM_DEPS) >/dev/null) || echo "warning: could not install $(SYSTEM_DEPS); their tests will skip"; \
	else echo "warning: not root or no apt-get: the tests of $(SYSTEM_DEPS) will skip"; fi

test: $(STAMP) system-deps
	$(PY) -m pytest -q --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The lint gate CI runs before the tests: ruff's checks and its formatter, and the layout's import rules
# (import-linter), all configured in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Train inside the compose stack (`docker compose up -d` first): its Ray cluster, tracked by its MLflow server.
WORKERS ?= 2
train-compose:
	docker compose exec ray-head aipd train --address 127.0.0.1:6379 --workers $(WORKERS) $(ARGS)

clean:
	rm -rf $(VENV) .aipd .pytest_cache
