# headrace developer entry points. `make test` is THE test command (README, .ci/run).
# Everything a fresh machine needs (venv, Kafka jars) is installed by these targets.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.headrace-installed
# Extra pytest arguments, e.g. `make test PYTEST_ARGS='-k broker -x'`.
PYTEST_ARGS ?=

.PHONY: venv kafka-jars kafka-start kafka-stop kafka-status test lint demo

# Reinstalls only when pyproject.toml changes (or the venv is missing).
venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

# Broker jars from Maven Central into ~/.cache/headrace/kafka/<version>/lib (no-op when present).
kafka-jars: venv
	@$(PY) -m headrace.runtime.localkafka.cli jars >/dev/null

# A long-lived local broker in deploy/kafka/run for manual work; `eval` the printed exports.
kafka-start: kafka-jars
	$(PY) -m headrace.runtime.localkafka.cli start

kafka-stop: venv
	$(PY) -m headrace.runtime.localkafka.cli stop

kafka-status: venv
	$(PY) -m headrace.runtime.localkafka.cli status

# Uses $$KAFKA_BOOTSTRAP_SERVERS if set, else Docker if a daemon answers, else starts a
# local broker from the jars for the session (see runtime/pytest_plugin.py).
test: venv kafka-jars
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The word-count demo: a local broker (unless KAFKA_BOOTSTRAP_SERVERS is set), two workers, exact check.
demo: venv kafka-jars
	$(PY) -m examples.wordcount
