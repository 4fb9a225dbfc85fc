# Two commands on a fresh machine:
#   make serve   installs what is needed and serves the default model on 127.0.0.1:8000
#   make test    installs what is needed and runs the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install serve test lint system-deps

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	# torch first: 2.13.0 is the local CPU build here; a looser spec would pull CUDA wheels.
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0 'uv>=0.5'
	# The rest through uv: the same packages as pip picks, installed (bytecode compiled) in about 40 s where pip
	# takes over two minutes on 2 cores. torch is already there and satisfies the requirement, so uv does not
	# fetch another build. If uv fails (an index only pip is configured for, say), pip does it.
	$(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode -e '.[test]' || \
	  $(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/agora serve $(ARGS)

# Debian packages some tests need, installed here if missing (as root or with passwordless sudo); where one
# cannot be, its tests skip and say why: postgresql (the governance tests start a throwaway server) and
# chromium (the dashboard test drives it headless; nothing downloads a browser build).
system-deps:
	@SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	apt_get() { $$SUDO apt-get install -y -q "$$1" || ( $$SUDO apt-get update -q && $$SUDO apt-get install -y -q "$$1" ); }; \
	{ ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
	  echo "installing Debian's postgresql for the governance tests"; \
	  apt_get postgresql >/dev/null 2>&1 || echo "could not install postgresql: the PostgreSQL tests will skip"; }; }; \
	{ command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the dashboard test"; \
	  apt_get chromium >/dev/null 2>&1 || echo "could not install chromium: the browser test will skip"; }; }

# pytest's exit code 5 ("no tests collected", e.g. a -k selection) is not a failure.
test: install system-deps
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

lint: install
	$(VENV)/bin/ruff check agora tests && $(VENV)/bin/ruff format --check agora tests
