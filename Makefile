# referral-watch: every target sets up its own virtual environment first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit docs bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "referral-watch needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/referral-watch demo

lint: $(STAMP)
	$(BIN)/ruff check referral_watch tests bench
	$(BIN)/ruff format --check referral_watch tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# Coverage floors: the whole package (the demo and the daemon run in subprocesses, which are
# not measured), and higher for the pure core that decides and words every message.
PURE_CORE := referral_watch/policy.py,referral_watch/render.py,referral_watch/i18n.py,referral_watch/channels.py,referral_watch/templates.py,referral_watch/text.py,referral_watch/model.py,referral_watch/ops.py,referral_watch/report.py

unit: $(STAMP)
	$(BIN)/pytest -q --cov --cov-report=term:skip-covered --cov-fail-under=85
	$(BIN)/coverage report --include='$(PURE_CORE)' --fail-under=95

# The reference site (docs/, mkdocs.yml) into site/; --strict: a broken link or anchor fails.
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install --quiet 'mkdocs-material>=9.5,<10'
	@touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test: lint typecheck unit docs

bench: $(STAMP)
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache .coverage
