VENV ?= .venv

.PHONY: install run test

install:
	bash scripts/install.sh $(VENV)

run: install
	$(VENV)/bin/harness run --methods all

test: install
	$(VENV)/bin/python -m pytest -q
	$(VENV)/bin/harness regress --ci
