# Entry points for people and CI; the real work is in scripts/setup.sh.
.DEFAULT_GOAL := help
VENV := .venv
ARGS ?=
PYTEST_ARGS ?=

.PHONY: help setup run test clean

help:
	@echo "make setup  install what is missing, start redis and dockerd, build the base image"
	@echo "make run    setup, then '$(VENV)/bin/lukewarm dev' (extra flags: ARGS='--port 9090')"
	@echo "make test   setup, then the whole pytest suite (extra flags: PYTEST_ARGS='-k name')"
	@echo "make clean  remove $(VENV) and caches (keeps the base image and ~/.cache/lukewarm)"
	@echo "LUKEWARM_SKIP_DOCKER=1 skips dockerd and the base image"

setup:
	bash scripts/setup.sh

run: setup
	$(VENV)/bin/lukewarm dev $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest -q tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
