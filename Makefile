# Two entry points (README Quickstart): `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
EXAMPLE := infer/examples/three_beeps.flac

.PHONY: demo test test-all system-deps clean

# pip's and the build backend's notices go to $(VENV)/install.log, shown only when an install fails.
$(PY):
	$(PYTHON) -m venv $(VENV) || ($(PYTHON) -m pip install --user virtualenv && $(PYTHON) -m virtualenv $(VENV))
	$(PIP) install -q --upgrade pip 2> $(VENV)/install.log || { cat $(VENV)/install.log >&2; exit 1; }

$(VENV)/.installed: pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q -c constraints.txt -e . 2> $(VENV)/install.log || { cat $(VENV)/install.log >&2; exit 1; }
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e ".[test]" 2> $(VENV)/install.log || { cat $(VENV)/install.log >&2; exit 1; }
	touch $@

# The main job: the embedded demo model answers a question about the bundled clip.
demo: $(VENV)/.installed
	$(PY) -m af2_jax.infer --audio $(EXAMPLE) --prompt "How many beeps are there?"

# Debian packages the tests use to make real audio (speech, tones, noise, mp3).
system-deps:
	@command -v espeak-ng >/dev/null && command -v sox >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq espeak-ng sox libsox-fmt-all; }

test: system-deps $(VENV)/.installed-test
	$(PY) -m pytest

# The default suite plus the tests marked slow.
test-all: system-deps $(VENV)/.installed-test
	$(PY) -m pytest -m ""

clean:
	rm -rf $(VENV) .pytest_cache
