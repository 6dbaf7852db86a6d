# packaging/rpm.mk: `make rpm`, the RPM package, included by the top Makefile.
#
#   make rpm          builds dist/dittohead-<version>-1.noarch.rpm (version from
#                     pyproject.toml) for RHEL/Rocky/Alma 9; as root, or with sudo
#                     for Debian's rpm and rpmlint, which it installs when missing
#   make rpm RPM_RHEL=   the package for EL 10 and Fedora instead (python3, not
#                     python3.11: see packaging/rpm/dittohead.spec)
#   make rpm-lint     rpmlint on the spec and the package (errors fail)
#   make rpm-clean    removes build/rpm and the .rpm
#   then, on the EL host:  dnf install ./dittohead-<version>-1.noarch.rpm
#
# How: rpmbuild -bb with its _topdir in build/rpm. The spec
# (packaging/rpm/dittohead.spec) gets its Version from pyproject.toml and a
# %changelog entry dated by the last commit, as packaging/deb.mk writes
# debian/changelog; its source is a tarball of the checkout's working tree
# (committed or not, as `make deb` takes it: what git tracks plus what it does
# not ignore; outside a git checkout, every file but .venv, .cache, build and
# dist). The spec installs with `make -f packaging/install.mk install
# DESTDIR=... PREFIX=/usr PYTHON=...`, like debian/rules.
#
# Built here with Debian's rpm (rpmbuild 4.18), which has none of the systemd
# rpm macros: the spec defines a fallback for each, only where it is missing.
# Packager (rpm's header, as a build system sets it, never the spec): debian/
# control's Maintainer. --nodeps: the build dependencies (make, the interpreter) are Debian packages
# here, which rpm's own empty database does not know. RPM_RHEL=9 stands in for what an EL 9 buildroot defines (%rhel 9), which
# picks the interpreter; Release has no %{?dist} then.
#
# rpmlint: Debian's rpmlint (2.4) with packaging/rpm/rpmlint.toml, which
# filters the warnings that are right for this package, each with why.

RPM_VERSION = $(shell sed -n 's/^version *= *"\([^"]*\)".*/\1/p' pyproject.toml | head -n 1)
RPM_RHEL ?= 9
RPM_TOPDIR := build/rpm
RPM_OUTDIR := dist
RPM_NAME = dittohead-$(RPM_VERSION)-1.noarch.rpm
RPM_SPEC = $(RPM_TOPDIR)/SPECS/dittohead.spec
RPM_LINTRC := packaging/rpm/rpmlint.toml
# Debian's rpm: rpmbuild (and rpm2cpio, cpio for tests); rpmlint.
RPM_BUILD_DEBS := rpm rpmlint

.PHONY: rpm rpm-deps rpm-spec rpm-lint rpm-clean

rpm: rpm-deps rpm-spec
	rm -rf $(RPM_TOPDIR)/BUILD $(RPM_TOPDIR)/BUILDROOT $(RPM_TOPDIR)/RPMS
	mkdir -p $(RPM_TOPDIR)/SOURCES
	{ if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	      git ls-files -z --cached --others --exclude-standard; \
	  else \
	      find . -path ./.git -prune -o -path ./.venv -prune -o -path ./.cache -prune \
	          -o -path ./build -prune -o -path ./dist -prune -o -type f -print0; \
	  fi; } \
	    | xargs -0 sh -c 'for f; do [ ! -e "$$f" ] || printf "%s\0" "$$f"; done' sh \
	    | tar --null -T - -czf $(RPM_TOPDIR)/SOURCES/dittohead-$(RPM_VERSION).tar.gz \
	        --transform 's|^\(\./\)\?|dittohead-$(RPM_VERSION)/|' --owner=0 --group=0
	cp -p units/dittohead.sysusers $(RPM_TOPDIR)/SOURCES/dittohead.sysusers
	rpmbuild -bb --nodeps --define '_topdir $(CURDIR)/$(RPM_TOPDIR)' \
	    --define "packager $$(sed -n 's/^Maintainer: *//p' packaging/debian/control)" \
	    $(if $(RPM_RHEL),--define 'rhel $(RPM_RHEL)') $(RPM_SPEC)
	mkdir -p $(RPM_OUTDIR)
	cp $(RPM_TOPDIR)/RPMS/noarch/$(RPM_NAME) $(RPM_OUTDIR)/$(RPM_NAME)
	@echo "built $(RPM_OUTDIR)/$(RPM_NAME)"

# The spec as rpmbuild and rpmlint read it: Version filled in, a %changelog entry.
rpm-spec:
	@test -n "$(RPM_VERSION)" || { echo "no version in pyproject.toml" >&2; exit 1; }
	mkdir -p $(RPM_TOPDIR)/SPECS
	@maint=$$(sed -n 's/^Maintainer: *//p' packaging/debian/control); \
	when=$$(git log -1 --format=%ct 2>/dev/null || date +%s); \
	day=$$(LC_ALL=C date -u -d "@$$when" '+%a %b %d %Y'); \
	{ sed 's/@VERSION@/$(RPM_VERSION)/' packaging/rpm/dittohead.spec; \
	  printf '%s\n' "* $$day $$maint - $(RPM_VERSION)-1" \
	      "- dittohead $(RPM_VERSION), built by make rpm from the checkout."; \
	} > $(RPM_SPEC)

# apt_ensure: defined in the top Makefile, which includes this file.
rpm-deps:
	$(call apt_ensure,$(RPM_BUILD_DEBS))

rpm-lint: rpm-spec
	rpmlint --config $(RPM_LINTRC) $(RPM_SPEC) $(RPM_OUTDIR)/$(RPM_NAME)

rpm-clean:
	rm -rf $(RPM_TOPDIR) $(RPM_OUTDIR)/dittohead-*.rpm
