VENV ?= .venv

.PHONY: install run test lock

install:
	bash scripts/install.sh $(VENV)

run: install
	$(VENV)/bin/harness run --methods all

# The environment check is strict here (packages outside the lock fail it): this is what CI runs.
test: install
	$(VENV)/bin/python scripts/check_env.py
	$(VENV)/bin/python -m pytest -q
	$(VENV)/bin/harness regress --ci

# Deliberate: re-resolve constraints/lock.txt from pyproject.toml (README: The lock).
lock:
	bash scripts/lock.sh
