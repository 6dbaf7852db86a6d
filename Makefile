# dittohead: `make demo` shows a delivery, `make test` runs every check.
# Both install what they need first (Debian packages, then a venv in .venv).

PY ?= python3
VENV := .venv
APT_PACKAGES := python3-venv python3-dev gcc pkg-config libsystemd-dev rsync \
	python3-yaml python3-systemd dbus

.PHONY: all deps venv test lint typecheck pytest demo bench clean
all: test

# Install the Debian packages of $(1) that are missing (with sudo when not root).
define apt_ensure
	@missing=$$(for p in $(1); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

# Debian packages: build deps of systemd-python (libsystemd-dev, pkg-config,
# gcc, headers), rsync for tests and benchmarks, and the runtime packages
# that `make install` uses for the system's python3.
deps:
	$(call apt_ensure,$(APT_PACKAGES))

$(VENV)/.stamp: pyproject.toml | deps
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,server]'
	touch $@

venv: deps $(VENV)/.stamp

lint: venv
	$(VENV)/bin/ruff check dittohead tests bench demo

typecheck: venv
	$(VENV)/bin/mypy

# Root and systemd tests run too: as root they use throwaway users and a
# throwaway systemd on an overlay root; without root they are skipped with
# the reason printed (see the -ra summary).
# lintian checks the .deb that tests/test_deb.py builds: without it that
# test is skipped, so CI (a clean root machine) gets it here.
TEST_APT_PACKAGES := lintian
# The storage campaign's fault filesystem (tests/campaign/faultfs.py) runs on
# Debian's python3 with pyfuse3 (it passes rename flags; fusepy does not).
TEST_APT_PACKAGES += python3-pyfuse3 fuse3
# A destination on sshfs is refused (tests/test_fstype.py, tests/test_campaign_sshfs.py).
TEST_APT_PACKAGES += sshfs

pytest: venv
	$(call apt_ensure,$(TEST_APT_PACKAGES))
	@$(MAKE) -s test-debs
	@$(MAKE) -s promtool
	$(VENV)/bin/pytest -v

# The servers that tests/test_uploaders.py runs inside the booted test systemd
# (tests/servers.py): only DOWNLOADED here, with their dependencies, into
# $(DEB_CACHE), never installed, so no smbd or sshd starts on this machine; the
# box installs them in its throwaway overlay. Run after lintian's install: the
# box sees this machine's packages and installs only what is missing. Cached
# debs are not fetched again; apt-get update runs only when the package lists
# are missing or stale.
# Without root the systemd tests are skipped, so nothing is fetched.
TEST_SERVER_DEBS := samba smbclient openssh-server
DEB_CACHE := .cache/debs
define fetch_debs
apt-get install -y -qq --download-only --no-install-recommends \
	    -o Dir::Cache::archives=$(CURDIR)/$(DEB_CACHE) $(TEST_SERVER_DEBS)
endef
.PHONY: test-debs
test-debs:
	@if [ "$$(id -u)" = 0 ]; then \
	    mkdir -p $(DEB_CACHE)/partial && \
	    { $(fetch_debs) >/dev/null 2>&1 || { apt-get update -qq && $(fetch_debs); }; } && \
	    apt-get autoclean -qq -o Dir::Cache::archives=$(CURDIR)/$(DEB_CACHE); \
	fi

# promtool checks the metrics and the sample alert rules (tests/test_metrics.py).
# It comes from Debian's prometheus package, which is never installed here
# (it would start a Prometheus server): the .deb is downloaded into
# $(DEB_CACHE) and only usr/bin/promtool (linked against libc alone) is
# extracted into .cache/prometheus. Any user can run this.
PROMTOOL := .cache/prometheus/usr/bin/promtool
.PHONY: promtool
promtool: $(PROMTOOL)
$(PROMTOOL):
	@mkdir -p $(DEB_CACHE) .cache/prometheus
	@cd $(DEB_CACHE) && { apt-get download -qq -o APT::Sandbox::User=root prometheus \
	    2>/dev/null || { apt-get update -qq && apt-get download -qq \
	    -o APT::Sandbox::User=root prometheus; }; }
	dpkg-deb -x "$$(ls -t $(DEB_CACHE)/prometheus_*.deb | head -1)" .cache/prometheus
	@rm -rf .cache/prometheus/usr/bin/prometheus .cache/prometheus/etc .cache/prometheus/lib
	@$(PROMTOOL) --version | head -1

test: lint typecheck pytest

# As root: the units at work on a booted throwaway systemd (demo_systemd.py
# exits 3 when none can boot here). Without root: the direct run.
demo: venv
	@if [ "$$(id -u)" = 0 ]; then \
	    $(VENV)/bin/python demo/demo_systemd.py; rc=$$?; \
	    [ $$rc -eq 3 ] || exit $$rc; \
	    echo "no throwaway systemd here: the direct run instead"; \
	fi; \
	$(VENV)/bin/python demo/demo.py

bench: venv
	$(VENV)/bin/python bench/bench_delivery.py

# As root: `dittohead upload --host` against `rsync -a` over ssh, in a booted
# throwaway systemd running the sample sshd (bench/remote_upload.py).
.PHONY: bench-remote
bench-remote: venv
	$(VENV)/bin/python bench/remote_upload.py --box

# As root: 1,000 uploads at once on a booted throwaway systemd (bench/burst.py).
.PHONY: burst
burst: venv
	$(VENV)/bin/python bench/burst.py

clean:
	rm -rf $(VENV) .cache .demo .mypy_cache .ruff_cache .pytest_cache *.egg-info build dist

-include packaging/install.mk
-include packaging/deb.mk
-include packaging/rpm.mk

# As root: the proof campaign with its full counts (tests/campaign/), which rewrites
# docs/reliability.md; `make test` runs it with reduced counts. Replay a run with
# DITTOHEAD_CAMPAIGN_SEED=<seed> (printed at its start).
.PHONY: campaign
campaign: venv
	rm -rf .cache/campaign/full
	DITTOHEAD_CAMPAIGN=full $(VENV)/bin/pytest -v -s -m campaign tests/test_campaign*.py
