# referral-watch: every target sets up its own environment first, from the lock file (uv.lock).
#
#   make demo          the demo (installs the runtime only)
#   make test          Debian test servers (as root), lint, types, every test: from the lock
#   make lock          re-resolve uv.lock from pyproject's ranges (after editing dependencies)
#   make upgrade       re-resolve to the newest releases, then run the tests
#   make test-latest   the suite on the newest releases, in a throwaway environment (lock untouched)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# uv itself is pinned by version and hash (requirements/uv.txt) and lives in a venv of its own,
# so `uv sync` (which removes what the lock does not name) never removes it.
UV_VENV := .uv
UV      := $(UV_VENV)/bin/uv
# uv uses the interpreter given, never downloads one, and never touches uv.lock unless asked.
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)
SYNC := $(UV) sync --locked --python $(PYTHON)

.PHONY: demo test test-deps lint lock-check typecheck unit docs bench lock upgrade test-latest clean

$(UV): requirements/uv.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "referral-watch needs Python 3.11 or newer (found " + sys.version.split()[0] + "): set PYTHON=python3.11 or newer")'
	$(PYTHON) -m venv $(UV_VENV)
	$(UV_VENV)/bin/pip install --quiet --disable-pip-version-check --require-hashes -r requirements/uv.txt
	@touch $(UV)

# The runtime alone (the demo); --inexact keeps the dev tools if `make test` installed them.
$(VENV)/.runtime: $(UV) uv.lock pyproject.toml
	$(SYNC) --no-dev --inexact
	@touch $@

# The runtime and the dev tools (tests, lint, types).
$(VENV)/.dev: $(UV) uv.lock pyproject.toml
	$(SYNC)
	@touch $@ $(VENV)/.runtime

demo: $(VENV)/.runtime
	$(BIN)/referral-watch demo

# The Debian packages the tests start for real: PostgreSQL, Chromium (browser tests, never a
# downloaded browser), libfaketime (clock tests) and prometheus (its promtool checks and
# unit-tests deploy/prometheus/rules.yaml). Installed with apt when run as root.
DEBIAN_TEST_PACKAGES := postgresql chromium faketime prometheus
test-deps:
	@missing=""; \
	for p in $(DEBIAN_TEST_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then \
	  echo "make test needs these Debian packages (or their equivalents):$$missing"; exit 1; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "make test needs Debian packages that are not installed. Install them, then run make test again:"; \
	  echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends$$missing"; exit 1; fi; \
	echo "installing Debian packages the tests need:$$missing"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null

lock-check: $(UV)
	$(UV) lock --check --python $(PYTHON)
	$(UV) export --frozen --no-dev --no-emit-project --format requirements-txt --no-header --quiet \
		| diff -u requirements/runtime.txt - \
		|| { echo "requirements/runtime.txt is not uv.lock's runtime: run 'make lock'"; exit 1; }

lint: $(VENV)/.dev lock-check
	$(BIN)/ruff check referral_watch tests bench
	$(BIN)/ruff format --check referral_watch tests bench

typecheck: $(VENV)/.dev
	$(BIN)/mypy

# Coverage floors: the whole package (the demo and the daemon run in subprocesses, which are
# not measured), and higher for the pure core that decides and words every message.
PURE_CORE := referral_watch/policy.py,referral_watch/render/messages.py,referral_watch/render/words.py,referral_watch/render/claims.py,referral_watch/render/claim_report.py,referral_watch/render/notices.py,referral_watch/render/template_check.py,referral_watch/render/i18n.py,referral_watch/render/channels.py,referral_watch/render/templates.py,referral_watch/text.py,referral_watch/model.py,referral_watch/ops.py,referral_watch/render/report.py

unit: $(VENV)/.dev
	$(BIN)/pytest -q --cov --cov-report=term:skip-covered --cov-fail-under=85
	$(BIN)/coverage report --include='$(PURE_CORE)' --fail-under=95

# The reference site (docs/, mkdocs.yml) into site/; --strict: a broken link or anchor fails.
docs: $(VENV)/.dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test: test-deps lint typecheck unit docs

bench: $(VENV)/.dev
	$(BIN)/python bench/bench.py

# uv.lock from pyproject's ranges, keeping every locked version that still fits; the runtime's
# requirements file (for pip users: the image, a host install) is exported from it.
lock: $(UV)
	$(UV) lock --python $(PYTHON)
	$(UV) export --frozen --no-dev --no-emit-project --format requirements-txt --no-header --quiet \
		-o requirements/runtime.txt

# Every package to its newest release within pyproject's ranges, then the whole suite on it.
upgrade: $(UV)
	$(UV) lock --upgrade --python $(PYTHON)
	$(MAKE) lock test

# The newest releases of everything in a throwaway environment (.venv-latest), lock untouched:
# upstream breakage shows here before users meet it.
LATEST := .venv-latest
test-latest: $(UV) test-deps
	rm -rf $(LATEST) && $(UV) venv --quiet --python $(PYTHON) $(LATEST)
	$(UV) pip compile --quiet --no-header --upgrade --python $(PYTHON) --group dev \
		pyproject.toml -o $(LATEST)/requirements.txt
	VIRTUAL_ENV=$(LATEST) $(UV) pip install --quiet -r $(LATEST)/requirements.txt
	VIRTUAL_ENV=$(LATEST) $(UV) pip install --quiet --no-deps -e .
	@touch $(LATEST)/.dev $(LATEST)/.runtime
	$(MAKE) VENV=$(LATEST) UV_PROJECT_ENVIRONMENT=$(LATEST) lint typecheck unit

clean:
	rm -rf $(VENV) $(UV_VENV) $(LATEST) site .pytest_cache .mypy_cache .ruff_cache .coverage
