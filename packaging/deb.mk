# packaging/deb.mk: `make deb`, the Debian package, included by the top
# Makefile.
#
#   make deb          builds dist/dittohead_<version>_all.deb (version from
#                     pyproject.toml); as root, or with sudo for the build
#                     dependencies it installs when missing
#   make deb DEB_VERSION=0.1.0+local2
#                     the same, as another version: the package's version and
#                     the installed program's (`dittohead --version`,
#                     dittohead/__init__.py's __version__, pyproject.toml's
#                     version in the staged tree) become DEB_VERSION; the
#                     checkout is not changed. For a site's own rebuilds, and
#                     what tests/campaign/upgrade.py upgrades and downgrades
#                     between (a Debian version: digits first, then letters,
#                     digits, + . ~ -)
#   make deb-lintian  runs lintian on it, when lintian is installed
#   make deb-clean    removes build/deb and the .deb
#   then:  apt install ./dist/dittohead_<version>_all.deb   (or dpkg -i)
#
# How: a debhelper (compat 13) source package, packaging/debian, built with
# `dpkg-buildpackage -us -uc -b`. Its debian/rules installs with this
# checkout's own `make install DESTDIR=debian/dittohead PREFIX=/usr`
# (packaging/install.mk), so the package and `make install` cannot drift
# apart, and lets the standard helpers write the maintainer scripts for what
# that installed, as a well-packaged Debian service does:
#   dh_installsysusers  postinst: systemd-sysusers dittohead.conf
#   dh_installtmpfiles  postinst: systemd-tmpfiles --create dittohead.conf
#   dh_python3          postinst: py3compile, prerm: py3clean
#   dh_installsystemd   --no-enable --no-start: every unit is a template
#                       (dittohead@.path, @.service, @.timer,
#                       dittohead-notify@.service), admins enable studies one
#                       by one; nothing is enabled or started
#   dh_installdeb       /etc/dittohead/config.yaml (packaging/config.yaml, no
#                       study) becomes a conffile
# and debian/postinst, prerm, postrm add the rest by hand: the journal
# catalog, `systemctl daemon-reload` when systemd runs (it also reruns the
# generator), stopping the studies' units on removal, dropping their
# dangling enablement links on purge. The dittohead user is never removed
# (Debian practice: its uid owns every study's receipts and data); see
# debian/postrm. debhelper did not fight the layout (the only gap: bookworm's
# dh_installsystemd looks at lib/systemd/system only, and has nothing to do
# for templates anyway), so no hand-rolled dpkg-deb --build.
#
# Where the Python package goes: /usr/lib/dittohead, as with `make install`,
# not dist-packages. dittohead is an application, not a library: nothing
# else imports it, so Debian's Python policy puts it in a private directory
# (/usr/lib/<package>, which dh_python3 byte-compiles by default). The
# launcher (/usr/bin/dittohead, `python3 -I`) and the units are then the same
# bytes as a `make install PREFIX=/usr`, and a pip-installed dittohead in
# some venv or site-packages can neither shadow it nor be shadowed.
#
# Where things go: the staged source tree and dpkg-buildpackage's
# .buildinfo/.changes in build/deb/, the .deb in dist/ (both .gitignore'd).
# The source tree is made fresh from the checkout each time (the working
# tree, committed or not): the package's code, units, config.yaml (the
# example), pyproject.toml, README.md and docs/*.md (which `make install`
# puts in /usr/share/doc/dittohead/, with the example, the sample Samba and
# sshd configs and the sample alert rules docs/dittohead-alerts.yml; dh_compress
# then gzips the larger ones), packaging/install.mk,
# packaging/config.yaml (the installed config), the manual page
# (packaging/dittohead.8), and packaging/debian as
# debian/, plus a debian/changelog written from pyproject.toml's version
# (a native package: no separate Debian revision), the Maintainer of
# debian/control and the date of the last commit.

# `make deb DEB_VERSION=...` overrides it (a command-line variable wins).
DEB_VERSION = $(shell sed -n 's/^version *= *"\([^"]*\)".*/\1/p' pyproject.toml | head -n 1)
DEB_BUILDDIR := build/deb
DEB_SRCDIR = $(DEB_BUILDDIR)/dittohead-$(DEB_VERSION)
DEB_OUTDIR := dist
DEB_NAME = dittohead_$(DEB_VERSION)_all.deb
# What dpkg-buildpackage and debian/control's Build-Depends need.
DEB_BUILD_DEBS := dpkg-dev debhelper dh-python python3

.PHONY: deb deb-deps deb-lintian deb-clean

deb: deb-deps
	@test -n "$(DEB_VERSION)" || { echo "no version in pyproject.toml" >&2; exit 1; }
	rm -rf $(DEB_BUILDDIR)
	mkdir -p $(DEB_SRCDIR)/dittohead $(DEB_SRCDIR)/units $(DEB_SRCDIR)/packaging
	cp -p dittohead/*.py $(DEB_SRCDIR)/dittohead/
	sed -i 's/^__version__ = .*/__version__ = "$(DEB_VERSION)"/' \
	    $(DEB_SRCDIR)/dittohead/__init__.py
	cp -p units/* $(DEB_SRCDIR)/units/
	cp -p config.yaml pyproject.toml README.md $(DEB_SRCDIR)/
	sed -i 's/^version *= *"[^"]*"/version = "$(DEB_VERSION)"/' $(DEB_SRCDIR)/pyproject.toml
	mkdir -p $(DEB_SRCDIR)/docs && cp -p docs/admin.md docs/contract.md docs/design.md \
	    docs/upload.md docs/dittohead-alerts.yml $(DEB_SRCDIR)/docs/
	cp -p packaging/install.mk packaging/dittohead.8 packaging/config.yaml \
	    $(DEB_SRCDIR)/packaging/
	cp -pR packaging/samba packaging/ssh $(DEB_SRCDIR)/packaging/
	cp -pR packaging/debian $(DEB_SRCDIR)/debian
	@maint=$$(sed -n 's/^Maintainer: *//p' packaging/debian/control); \
	date=$$(git log -1 --format=%cD 2>/dev/null || date -R); \
	printf '%s\n' \
	    "dittohead ($(DEB_VERSION)) unstable; urgency=medium" "" \
	    "  * dittohead $(DEB_VERSION), built by \`make deb\` from the checkout." "" \
	    " -- $$maint  $$date" > $(DEB_SRCDIR)/debian/changelog
	cd $(DEB_SRCDIR) && dpkg-buildpackage -us -uc -b
	mkdir -p $(DEB_OUTDIR)
	cp $(DEB_BUILDDIR)/$(DEB_NAME) $(DEB_OUTDIR)/$(DEB_NAME)
	@echo "built $(DEB_OUTDIR)/$(DEB_NAME)"

# apt_ensure: defined in the top Makefile, which includes this file.
deb-deps:
	$(call apt_ensure,$(DEB_BUILD_DEBS))

deb-lintian:
	@if command -v lintian >/dev/null; then \
		lintian --info --display-info --pedantic $(DEB_OUTDIR)/$(DEB_NAME); \
	else \
		echo "lintian is not installed (apt-get install lintian)"; \
	fi

deb-clean:
	rm -rf $(DEB_BUILDDIR) $(DEB_OUTDIR)/dittohead_*.deb
