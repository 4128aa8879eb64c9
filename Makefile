# The README's two commands: `make demo` (set up + run a whole federation) and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# Headless Chromium renders report.html in tests/test_report.py; `make test` installs Debian's package
# when it is missing (`make demo` does not need it).
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: demo test install check-install

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $@

# The app's own modules compiled here, as pip compiles the packages it installs: where Python writes no bytecode
# (PYTHONDONTWRITEBYTECODE, set in many containers) every process of a run (the launcher, each ClientApp actor, the
# report's drawing child) would compile them from source again. Incremental: ~0.05 s when they are current.
BYTECODE := -m compileall -q -x '/\.' .

demo: $(STAMP)
	$(VENV)/bin/python $(BYTECODE)
	$(VENV)/bin/radfed demo

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

test: $(STAMP) $(CHROMIUM)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python $(BYTECODE)
	$(VENV)/bin/python -m pytest -q --durations=25

# Opt-in, not part of `make test` (it builds a fresh venv: minutes): does a clean `pip install .` bring
# everything radfed imports? torch goes in first, pinned, so pip takes the CPU wheel on local disk
# instead of resolving a multi-GB CUDA build. The imports run outside the work tree so they load the
# installed wheel; `radfed profile show` checks that the profile YAML is packaged too.
check-install:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install -q --upgrade pip; \
	"$$tmp/venv/bin/python" -m pip install -q torch==2.13.0; \
	"$$tmp/venv/bin/python" -m pip install -q .; \
	cd "$$tmp" && venv/bin/python -c 'import importlib, pkgutil; \
	pkgs = [importlib.import_module(p) for p in ("common", "client", "server", "radfed", "deploy")]; \
	mods = [m.name for p in pkgs for m in pkgutil.walk_packages(p.__path__, p.__name__ + ".")]; \
	[importlib.import_module(m) for m in mods if not m.endswith("__main__")]; \
	print(f"check-install: {len(pkgs) + len(mods)} modules import from a clean install")'; \
	venv/bin/radfed profile show >profile.txt; head -1 profile.txt
