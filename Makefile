# A fresh machine needs only python3 (>= 3.10) with venv: `make demo` and `make test` create .venv,
# install the pinned dependencies (torch 2.13.0 CPU; never torchvision/timm) and run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-dev.txt | cksum | cut -d' ' -f1)

.PHONY: install demo test bench clean browser-deps bench-deps pg-deps

install: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned, so nothing later pulls a CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt -e ".[export,service,test,bench,ray,postgres,openvino]"
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	$(BIN)/gaikan demo

test: install browser-deps pg-deps
	$(BIN)/python -m pytest -q

# headless Chromium + chromedriver (Debian packages) for the @pytest.mark.browser tests
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser-deps:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium chromium-driver) || \
	  echo "WARNING: could not install chromium/chromium-driver: the browser tests will be SKIPPED" >&2

# Debian data packages with the real texture photographs of bench/surfaces_data.py (benchmark only;
# about 97 MB: OpenArena's photographic textures and MyPaint's paper scans)
bench-deps:
	test -f /usr/share/games/openarena/baseoa/pak4-textures.pk3 && test -d /usr/share/mypaint/backgrounds || \
	  ($(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends openarena-081-textures mypaint-data-extras)

# PostgreSQL server binaries (Debian package; the tests run initdb + pg_ctl in a temp dir) for the
# `serve --db postgresql://` tests; Debian keeps them in /usr/lib/postgresql/VERSION/bin, off PATH
pg-deps:
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null || \
	  ($(SUDO) apt-get update && $(SUDO) apt-get install -y postgresql) || \
	  echo "WARNING: could not install postgresql: the PostgreSQL log tests will be SKIPPED" >&2

bench: install
	$(BIN)/python bench/elpv.py

clean:
	rm -rf $(VENV) gaikan-demo .pytest_cache
