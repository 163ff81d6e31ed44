# cbtstream: two commands on a fresh machine.
#   make demo   sets up everything (Python env, Kafka, PostgreSQL, vSphere simulator) and runs a
#               demo replication of a three-disk VM over three cycles.
#   make test   sets up the same and runs the whole test suite against the real services.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install stack demo test soak unit lint down clean bench-copy bench-pipeline

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

stack: install
	$(BIN)/cbtstream --log-format console stack up

demo: stack
	$(BIN)/cbtstream --log-format console demo

# The 25 slowest tests are listed at the end: the suite must stay well under 30 minutes.
test: stack
	$(BIN)/pytest --durations=25

# Long hardening runs (crash tests with many more kills, 10k-disk load); not part of `make test`.
soak: stack
	$(BIN)/pytest -m soak tests

# Every test that needs no stack, wherever it lives: tests that need Kafka, PostgreSQL or the
# vSphere simulator carry the `integration` marker (the rule and its check: tests/conftest.py).
unit: install
	$(BIN)/pytest -m "not integration and not soak" tests

# Dead code: vulture reads the packages and tests/ (code only tests use is not dead) and reports
# what the packages define and nothing uses; its settings and whitelist are [tool.vulture] in
# pyproject.toml. vulture exits 3 when it finds something, 1 or 2 when it cannot run.
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	out=$$($(BIN)/vulture cbtstream cbtctl schemas streams producers consumers tests); \
	rc=$$?; if [ $$rc -ne 0 ] && [ $$rc -ne 3 ]; then exit $$rc; fi; \
	out=$$(printf '%s\n' "$$out" | grep -v '^tests/'); \
	if [ -n "$$out" ]; then printf '%s\n' "$$out"; exit 1; fi

bench-copy: install
	$(BIN)/cbtstream bench copy

bench-pipeline: stack
	$(BIN)/cbtstream bench pipeline

down:
	-$(BIN)/cbtstream --log-format console stack down

clean: down
	rm -rf .stack $(VENV)
