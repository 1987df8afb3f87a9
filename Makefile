# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
# Python 3.11; torch==2.13.0 is a CPU build that pip finds on these machines' disk (see README).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 7860
# Debian packages the tests need: speech synthesis for test audio, a browser for the UI test, audio tools.
DEBS := espeak-ng chromium sox ffmpeg libportaudio2
# Commands checked by name (a machine may have them without the Debian package): npm fetches the Kokoro voices
# (npm package kokoro-js, training/speech_data.py); installed from Debian only when the command is missing.
COMMANDS := npm

.PHONY: run test venv test-env debs bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.runtime-installed: requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.test-installed: requirements-test.txt $(VENV)/.runtime-installed
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

venv: $(VENV)/.runtime-installed

test-env: $(VENV)/.test-installed debs

# Installs the Debian packages only when one is missing (as root, or through sudo when it exists).
debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	for c in $(COMMANDS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

run: venv
	HF_HUB_OFFLINE=1 $(PY) app.py --host $(HOST) --port $(PORT)

test: test-env
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: venv
	@for b in bench/bench_*.py; do echo "== $$b"; HF_HUB_OFFLINE=1 $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
