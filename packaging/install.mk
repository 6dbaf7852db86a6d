# packaging/install.mk: `make install` and `make uninstall`, included by the
# top Makefile.
#
# As root on a live systemd host, from a checkout:   make install
# Staged (the Debian package):  make install DESTDIR=debian/tmp PREFIX=/usr
#
# Installs the package for Debian's /usr/bin/python3 without pip (its
# runtime dependencies are the Debian packages python3-yaml and
# python3-systemd: installed with apt-get when missing and DESTDIR is empty),
# the `dittohead` command and its manual page, the systemd units, the
# generator, the sysusers.d and tmpfiles.d files, the journal catalog, the
# documentation in /usr/share/doc/dittohead (what dittohead(8)'s SEE ALSO
# names: the admin guide, the contract, the user guide, the design, the
# README, the documented example config.yaml.example and the sample Samba and
# sshd configs in examples/), and /etc/dittohead/config.yaml when there is
# none yet: packaging/config.yaml, which holds no study (the example's study
# would point at a destination and mail addresses that do not exist). An
# existing config is never touched. Then, when DESTDIR is empty: systemd-sysusers (the
# dittohead user and group), systemd-tmpfiles --create dittohead.conf,
# journalctl --update-catalog, and, when systemd is the running init,
# systemctl daemon-reload (which runs the generator).
# The Debian package (packaging/deb.mk) runs this with DESTDIR and PREFIX=/usr
# and does the rest in its maintainer scripts.
#
# systemd 252 reads units from /usr/local/lib/systemd/system, generators from
# /usr/local/lib/systemd/system-generators and sysusers.d from
# /usr/local/lib/sysusers.d and tmpfiles.d from /usr/local/lib/tmpfiles.d
# (`systemd-analyze unit-paths`, `systemd-sysusers --cat-config`,
# `systemd-tmpfiles --cat-config`), so PREFIX=/usr/local needs nothing else.
# The catalog goes to /usr/lib/systemd/catalog, where journalctl's own live.

PREFIX ?= /usr/local
DESTDIR ?=
PYTHON ?= /usr/bin/python3
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib/dittohead
UNITDIR ?= $(PREFIX)/lib/systemd/system
GENERATORDIR ?= $(PREFIX)/lib/systemd/system-generators
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
CATALOGDIR ?= /usr/lib/systemd/catalog
MANDIR ?= $(PREFIX)/share/man
SYSCONFDIR ?= /etc
# Where dittohead(8) says the documentation is, whatever PREFIX.
DOCDIR ?= /usr/share/doc/dittohead
DITTOHEAD_DOCS := README.md docs/admin.md docs/contract.md docs/design.md docs/upload.md

DITTOHEAD_UNITS := dittohead@.path dittohead@.service dittohead@.timer dittohead-notify@.service \
	dittohead-mail@.service dittohead-purge.service dittohead-purge.timer \
	dittohead-metrics.service dittohead-metrics.timer
DITTOHEAD_DEBS := python3-yaml python3-systemd

# A Python launcher: runs the package installed in LIBDIR with the system
# Python, isolated (-I: no PYTHONPATH, no user site, no current directory).
define dittohead_launcher
#!$(PYTHON) -I
# Installed by dittohead's `make install`.
import sys
sys.path.insert(0, "$(LIBDIR)")
from $(1) import $(2)
sys.exit($(2)())
endef
export dittohead_cli_launcher := $(call dittohead_launcher,dittohead.early,main)
export dittohead_generator_launcher := $(call dittohead_launcher,dittohead.generator,main)

.PHONY: install install-deps install-files uninstall

install: install-deps install-files
	@if [ -z "$(DESTDIR)" ]; then \
	    set -e; \
	    echo "systemd-sysusers $(SYSUSERSDIR)/dittohead.conf"; \
	    systemd-sysusers $(SYSUSERSDIR)/dittohead.conf; \
	    echo "systemd-tmpfiles --create dittohead.conf"; \
	    systemd-tmpfiles --create dittohead.conf; \
	    echo "journalctl --update-catalog"; \
	    journalctl --update-catalog; \
	    if [ -d /run/systemd/system ]; then \
	        echo "systemctl daemon-reload"; \
	        systemctl daemon-reload; \
	    else \
	        echo "systemd is not running here: no daemon-reload"; \
	    fi; \
	fi

install-deps:
	@if [ -z "$(DESTDIR)" ]; then \
	    missing=""; \
	    for p in $(DITTOHEAD_DEBS); do \
	        dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' \
	            || missing="$$missing $$p"; \
	    done; \
	    if [ -n "$$missing" ]; then \
	        echo "apt-get install$$missing"; \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing \
	            || { echo "install$$missing first (apt-get update?)" >&2; exit 1; }; \
	    fi; \
	fi

install-files:
	install -d $(DESTDIR)$(LIBDIR)/dittohead $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) \
	    $(DESTDIR)$(GENERATORDIR) $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(TMPFILESDIR) \
	    $(DESTDIR)$(CATALOGDIR)
	rm -rf $(DESTDIR)$(LIBDIR)/dittohead/__pycache__
	install -m 0644 dittohead/*.py $(DESTDIR)$(LIBDIR)/dittohead/
	$(PYTHON) -m compileall -q -d $(LIBDIR)/dittohead $(DESTDIR)$(LIBDIR)/dittohead
	install -m 0755 units/dittohead-notify-failure $(DESTDIR)$(LIBDIR)/notify-failure
	printf '%s\n' "$$dittohead_cli_launcher" > $(DESTDIR)$(BINDIR)/dittohead
	chmod 0755 $(DESTDIR)$(BINDIR)/dittohead
	printf '%s\n' "$$dittohead_generator_launcher" > $(DESTDIR)$(GENERATORDIR)/dittohead-generator
	chmod 0755 $(DESTDIR)$(GENERATORDIR)/dittohead-generator
	for u in $(DITTOHEAD_UNITS); do \
	    sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@LIBDIR@|$(LIBDIR)|g' units/$$u \
	        > $(DESTDIR)$(UNITDIR)/$$u && chmod 0644 $(DESTDIR)$(UNITDIR)/$$u || exit 1; \
	done
	install -m 0644 units/dittohead.sysusers $(DESTDIR)$(SYSUSERSDIR)/dittohead.conf
	install -m 0644 units/dittohead.tmpfiles $(DESTDIR)$(TMPFILESDIR)/dittohead.conf
	install -m 0644 units/dittohead.catalog $(DESTDIR)$(CATALOGDIR)/dittohead.catalog
	install -D -m 0644 packaging/dittohead.8 $(DESTDIR)$(MANDIR)/man8/dittohead.8
	install -d $(DESTDIR)$(DOCDIR)/examples
	install -m 0644 $(DITTOHEAD_DOCS) $(DESTDIR)$(DOCDIR)/
	install -m 0644 config.yaml $(DESTDIR)$(DOCDIR)/config.yaml.example
	install -m 0644 packaging/samba/dittohead-smb.conf packaging/ssh/dittohead-sshd.conf \
	    docs/dittohead-alerts.yml $(DESTDIR)$(DOCDIR)/examples/
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/dittohead/config.yaml ] || \
	    [ -L $(DESTDIR)$(SYSCONFDIR)/dittohead/config.yaml ]; then \
	    echo "keeping $(DESTDIR)$(SYSCONFDIR)/dittohead/config.yaml"; \
	else \
	    echo "install -D -m 0644 packaging/config.yaml $(DESTDIR)$(SYSCONFDIR)/dittohead/config.yaml"; \
	    install -D -m 0644 packaging/config.yaml $(DESTDIR)$(SYSCONFDIR)/dittohead/config.yaml; \
	fi

# Leaves /etc/dittohead (the admin's config), the dittohead user, the
# dropbox root and every study's data alone. Stop and disable the study
# units first:
#   systemctl disable --now 'dittohead@*.path' 'dittohead@*.timer'
uninstall:
	rm -f $(DESTDIR)$(BINDIR)/dittohead $(DESTDIR)$(GENERATORDIR)/dittohead-generator
	rm -rf $(DESTDIR)$(LIBDIR)
	for u in $(DITTOHEAD_UNITS); do rm -f $(DESTDIR)$(UNITDIR)/$$u; done
	rm -f $(DESTDIR)$(SYSUSERSDIR)/dittohead.conf $(DESTDIR)$(TMPFILESDIR)/dittohead.conf \
	    $(DESTDIR)$(CATALOGDIR)/dittohead.catalog $(DESTDIR)$(MANDIR)/man8/dittohead.8
	rm -rf $(DESTDIR)$(DOCDIR)
	@if [ -z "$(DESTDIR)" ]; then \
	    journalctl --update-catalog; \
	    if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi; \
	fi
