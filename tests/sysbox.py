"""Boot a throwaway systemd in private namespaces on an overlay of / for tests.

The box sees the host's files through a copy-on-write overlay kept in a tmpfs, so nothing
it does (tmpfiles, useradd, journald, `make install`) reaches the host; see docs/field-notes.md.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import BinaryIO, Self

__all__ = ["Sysbox", "SysboxError", "available"]

SYSTEMD = "/lib/systemd/systemd"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The host's environment (pyenv shims, PYTHONPATH, a venv) must not leak into the box.
ENV = {
    "PATH": PATH,
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "PAGER": "cat",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}
TOOLS = ("unshare", "nsenter", "setpriv", "setsid", "mount", "umount", "pivot_root", "mknod")

# Distro-wired units that would act on the kernel, the hardware or the host's disks, and the
# host's own daemons and timers (network, PostgreSQL, cron, ssh, rsync, apt, fstrim, ...),
# which have no business in a test box; admin-enabled units (/etc/systemd/system/*.wants)
# are dropped wholesale.
MASKED_UNITS = (
    "getty.target", "getty@.service", "serial-getty@.service", "console-getty.service",
    "container-getty@.service", "getty-static.service", "autovt@.service",
    "systemd-udevd.service", "systemd-udevd-control.socket", "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service", "systemd-udev-settle.service", "systemd-hwdb-update.service",
    "systemd-sysctl.service", "systemd-modules-load.service", "kmod-static-nodes.service",
    "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount", "systemd-timesyncd.service",
    "systemd-time-wait-sync.service", "systemd-random-seed.service", "systemd-pstore.service",
    "systemd-remount-fs.service", "systemd-fsck-root.service", "systemd-fsck@.service",
    "systemd-growfs-root.service", "systemd-growfs@.service", "systemd-repart.service",
    "systemd-makefs@.service", "systemd-firstboot.service", "systemd-machine-id-commit.service",
    "systemd-pcrphase.service", "systemd-pcrphase-sysinit.service",
    "systemd-pcrphase-initrd.service", "sys-kernel-debug.mount", "sys-kernel-tracing.mount",
    "sys-kernel-config.mount", "sys-fs-fuse-connections.mount", "dev-hugepages.mount",
    "systemd-journald-audit.socket", "systemd-ask-password-console.path",
    "systemd-ask-password-wall.path", "networking.service", "NetworkManager.service",
    "systemd-networkd.service", "systemd-networkd-wait-online.service",
    "postgresql.service", "postgresql@.service", "cron.service", "anacron.service",
    "ssh.service", "ssh.socket", "rsync.service", "e2scrub_reap.service",
    "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "e2scrub_all.timer",
    "fstrim.timer", "man-db.timer", "logrotate.timer",
)
# Generators that turn host state (fstab, disks, init scripts, clusters) into units.
MASKED_GENERATORS = (
    "systemd-fstab-generator", "systemd-getty-generator", "systemd-gpt-auto-generator",
    "systemd-hibernate-resume-generator", "systemd-cryptsetup-generator",
    "systemd-integritysetup-generator", "systemd-veritysetup-generator",
    "systemd-rc-local-generator", "systemd-sysv-generator", "postgresql-generator",
)
# Capabilities whose effects are global to the machine: the box may not set the clock, load
# modules, kexec, read or clear the kernel log, or change audit rules.
DROPPED_CAPS = (
    "sys_module", "sys_time", "sys_boot", "sys_rawio", "wake_alarm", "syslog",
    "audit_control", "audit_read", "mac_admin", "mac_override", "block_suspend",
)

# Runs as PID 1 of the box's new pid namespace, in private mount/uts/ipc(/net) namespaces,
# until it execs systemd. Every path it writes is below $W, which in this mount namespace
# holds the box's tmpfs and overlay: nothing here can land on the host.
SETUP_SH = r"""
set -eu
if [ "$1" = outer ]; then
    # Join the box cgroup alone (the unshare parent stays outside, so systemd may enable
    # controllers there), then root a cgroup namespace in it for systemd to own.
    echo 0 > "$2/cgroup.procs"
    shift 2
    exec unshare --cgroup -- /bin/sh "$0" inner "$@"
fi
shift
W=$1 CONSOLE=$2 MACHINE_ID=$3
shift 3
R=$W/root S=$W/state

# The overlay's upper layer: what the box installs (Samba, OpenSSH from
# .cache/debs) and writes (uploaders' homes hold test trees of 48 MiB each). 512m
# was measured too tight once every test module's box added its own; a tmpfs
# takes only the memory it holds.
mount -t tmpfs -o mode=0755,size=1g sysbox-state "$S"
mkdir "$S/upper" "$S/work"
mount -t overlay -o "lowerdir=/,upperdir=$S/upper,workdir=$S/work" sysbox-root "$R"
mountpoint -q "$R"

mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
# As systemd-nspawn does: these proc files act on the whole machine.
for p in sys sysrq-trigger irq bus fs acpi asound scsi; do
    if [ -e "$R/proc/$p" ]; then
        mount --bind "$R/proc/$p" "$R/proc/$p"
        mount -o remount,bind,ro "$R/proc/$p"
    fi
done
# Read-only sysfs keeps udev-ish units (ConditionPathIsReadWrite=/sys) off; the cgroup2
# mount shows only the box cgroup, as the root of the box's cgroup namespace.
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"

# A private /dev: no host disks, no /dev/kmsg; the console is a pty the host logs to a file.
mount -t tmpfs -o mode=0755,size=4m,nosuid sysbox-dev "$R/dev"
mknod -m 666 "$R/dev/null" c 1 3
mknod -m 666 "$R/dev/zero" c 1 5
mknod -m 666 "$R/dev/full" c 1 7
mknod -m 666 "$R/dev/random" c 1 8
mknod -m 666 "$R/dev/urandom" c 1 9
mknod -m 666 "$R/dev/tty" c 5 0
mkdir "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777,size=64m,nosuid,nodev sysbox-shm "$R/dev/shm"
ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"
ln -s /proc/self/fd/2 "$R/dev/stderr"
touch "$R/dev/console"
mount --bind "$CONSOLE" "$R/dev/console"

# Fresh /run, /tmp, /var/tmp: the box's tmpfiles-setup must never see the host's.
mount -t tmpfs -o mode=0755,size=64m,nosuid,nodev sysbox-run "$R/run"
mount -t tmpfs -o mode=1777,size=256m,nosuid,nodev sysbox-tmp "$R/tmp"
mount -t tmpfs -o mode=1777,size=256m,nosuid,nodev sysbox-vartmp "$R/var/tmp"

# Each bind is its own copy-on-write overlay at the same path (after /tmp, which may hold it).
i=0
for p in "$@"; do
    i=$((i + 1))
    mkdir "$S/bind$i" "$S/bind$i/upper" "$S/bind$i/work"
    mkdir -p "$R$p"
    mount -t overlay -o "lowerdir=$p,upperdir=$S/bind$i/upper,workdir=$S/bind$i/work" \
        sysbox-bind "$R$p"
done

# Its own machine id: its journal is its own, and journalctl inside shows nothing of the host.
echo "$MACHINE_ID" > "$R/etc/machine-id"
# Start as a fresh install: nothing the host's admin enabled, none of the masked units.
rm -rf "$R"/etc/systemd/system/*.wants "$R"/etc/systemd/system/*.requires
mkdir -p "$R/etc/systemd/system" "$R/run/systemd/system-generators"
for u in $MASKED_UNITS; do ln -sfn /dev/null "$R/etc/systemd/system/$u"; done
for g in $MASKED_GENERATORS; do ln -sfn /dev/null "$R/run/systemd/system-generators/$g"; done
# multi-user, not the distro's graphical.target: no display manager, and analyze/time agree.
ln -sfn /lib/systemd/system/multi-user.target "$R/etc/systemd/system/default.target"

# pivot_root (not chroot) so the box's mount table holds only its own mounts.
cd "$R"
pivot_root . .
umount -l .
cd /
# The limit a real boot gives (DefaultLimitNOFILE=1024:524288), not the caller's; without
# CAP_SYS_RESOURCE (some sandboxes) the caller's hard limit stays.
ulimit -n 524288 2>/dev/null || :
exec setsid setpriv --bounding-set="$DROPPED_CAPS" -- \
    /lib/systemd/systemd --system --log-color=no
"""


class SysboxError(RuntimeError):
    """A box failed to boot or to shut down."""


def _tool(name: str) -> str:
    found = shutil.which(name, path=PATH)
    if found is None:
        raise SysboxError(f"{name} not found in {PATH}")
    return found


def _cgroup2_root() -> pathlib.Path | None:
    """Where the host's cgroup2 hierarchy is mounted (/sys/fs/cgroup or .../unified)."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "cgroup2":
                return pathlib.Path(fields[4].replace("\\040", " "))
    return None


def _check_path(path: pathlib.Path, what: str) -> pathlib.Path:
    path = path.resolve()
    # overlayfs options are split on ',' and ':'; the setup script splits nothing else.
    if any(c in str(path) for c in ",:\\\n\t ") or path == pathlib.Path("/"):
        raise SysboxError(f"{what} {str(path)!r}: unusable path (no , : \\ or whitespace)")
    return path


@functools.cache
def available() -> str | None:
    """None if a box can boot here, else why not (for a loud pytest skip)."""
    if os.geteuid() != 0:
        return f"needs root (running as uid {os.geteuid()})"
    if not os.access(SYSTEMD, os.X_OK):
        return f"no {SYSTEMD}"
    missing = [t for t in TOOLS if shutil.which(t, path=PATH) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (util-linux, mount, coreutils)"
    if _cgroup2_root() is None:
        return "no cgroup2 hierarchy mounted (systemd in the box needs one)"
    # A real probe: in a throwaway mount namespace, the same tmpfs + overlay-of-/ mount.
    probe = tempfile.mkdtemp(prefix="sysbox-probe-", dir="/var/tmp")
    try:
        r = subprocess.run(
            [_tool("unshare"), "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
             'mount -t tmpfs -o size=1m probe "$0" && mkdir "$0/u" "$0/w" "$0/m" && '
             'mount -t overlay -o "lowerdir=/,upperdir=$0/u,workdir=$0/w" probe "$0/m" && '
             'test -x "$0/m/lib/systemd/systemd"', probe],
            capture_output=True, text=True, env=ENV, timeout=30, check=False,
        )
    finally:
        os.rmdir(probe)
    if r.returncode != 0:
        return f"cannot mount an overlay of / in a mount namespace: {r.stderr.strip()}"
    return None


def proc_stat(pid: int | str, field: int) -> str | None:
    """A field of /proc/PID/stat, counted from 3 (state) as in proc(5)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[field - 3]
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    """A process's start time, so a recycled PID is never mistaken for ours."""
    return proc_stat(pid, 22)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="utf-8") as f:
            return [int(p) for p in f.read().split()]
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN: scan
        pass
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and proc_stat(d, 4) == str(pid)]


def _remove_stale_cgroups(cg_root: pathlib.Path) -> None:
    """Remove empty cgroups of boxes whose Python died without poweroff (SIGKILL)."""
    for cg in cg_root.glob("sysbox-*-*"):
        creator = cg.name.split("-")[1]
        with contextlib.suppress(OSError):
            if (
                creator.isdigit()
                and not pathlib.Path(f"/proc/{creator}").exists()
                and "populated 0" in (cg / "cgroup.events").read_text()
            ):
                Sysbox._remove_cgroup(cg)


def _pump(master: int, log: BinaryIO) -> None:
    """Copy the box console into the log until every slave end is closed."""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the box is gone and we closed our slave end
            return
        if not data:
            return
        log.write(data.replace(b"\r\n", b"\n"))
        log.flush()


_live: list[Sysbox] = []


@atexit.register
def _poweroff_all() -> None:
    # A test run that dies half-way must not leave a box running.
    for box in list(_live):
        box.poweroff()


class Sysbox:
    """A running throwaway systemd; create with Sysbox.boot(), stop with poweroff()."""

    def __init__(self, workdir: pathlib.Path, created: bool) -> None:
        self.workdir = workdir
        self.log = workdir / "console.log"
        self.state = ""  # what is-system-running said at boot: running or degraded
        self._created = created
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid = 0  # host PID of the box's systemd
        self._pid_start: str | None = None
        self._cgroup: pathlib.Path | None = None
        self._master = -1
        self._slave = -1
        self._logf: BinaryIO | None = None
        self._pump: threading.Thread | None = None
        self._script = workdir / "sysbox-setup.sh"

    @property
    def pid(self) -> int:
        """Host PID of the box's systemd (PID 1 inside)."""
        return self._pid

    @classmethod
    def boot(
        cls,
        workdir: pathlib.Path,
        *,
        binds: Sequence[pathlib.Path] = (),
        timeout: float = 60,
        host_network: bool = False,
    ) -> Sysbox:
        """Boot a box using workdir for its state; binds appear copy-on-write at their paths."""
        reason = available()
        if reason is not None:
            raise SysboxError(f"cannot boot a sysbox here: {reason}")
        workdir = _check_path(workdir, "workdir")
        bind_paths = [_check_path(b, "bind") for b in binds]
        for b in bind_paths:
            if not b.is_dir():
                raise SysboxError(f"bind {b}: not a directory")
        created = not workdir.exists()
        workdir.mkdir(parents=True, exist_ok=True)
        box = cls(workdir, created)
        try:
            # Not exist_ok: two boxes sharing a workdir would mount over each other.
            (workdir / "root").mkdir()
            (workdir / "state").mkdir()
        except FileExistsError:
            raise SysboxError(
                f"{workdir} is in use by a box, or left by one whose Python was killed: "
                "if no box runs there, rmdir its root/ and state/ (empty on the host)"
            ) from None
        try:
            box._start(bind_paths, host_network)
            box._wait_running(time.monotonic() + timeout)
        except BaseException as e:
            tail = box._log_tail()
            box.poweroff()
            if isinstance(e, SysboxError):
                raise SysboxError(f"{e}\n--- console (last lines) ---\n{tail}") from None
            raise
        return box

    def _start(self, binds: list[pathlib.Path], host_network: bool) -> None:
        cg_root = _cgroup2_root()
        assert cg_root is not None
        _remove_stale_cgroups(cg_root)
        self._cgroup = cg_root / f"sysbox-{os.getpid()}-{secrets.token_hex(4)}"
        self._cgroup.mkdir()
        self._script.write_text(
            f"MASKED_UNITS='{' '.join(MASKED_UNITS)}'\n"
            f"MASKED_GENERATORS='{' '.join(MASKED_GENERATORS)}'\n"
            f"DROPPED_CAPS='{','.join('-' + c for c in DROPPED_CAPS)}'\n" + SETUP_SH,
            encoding="utf-8",
        )
        self._logf = open(self.log, "ab")  # noqa: SIM115 (closed in poweroff)
        # systemd writes status and its own log to /dev/console; a pty keeps it off the
        # host console and out of pytest's output, and a thread drains it into console.log.
        self._master, self._slave = os.openpty()
        self._pump = threading.Thread(
            target=_pump, args=(self._master, self._logf), name="sysbox-console", daemon=True
        )
        self._pump.start()
        argv = [
            # If this Python dies, the kernel kills unshare, which kills the box's PID 1,
            # which takes the whole pid namespace (and so every process of the box) with it.
            _tool("setpriv"), "--pdeathsig", "KILL", "--",
            _tool("unshare"), "--mount", "--uts", "--ipc", "--pid", "--fork",
            "--kill-child=KILL", "--propagation", "private",
            *([] if host_network else ["--net"]),
            "--", "/bin/sh", str(self._script), "outer", str(self._cgroup),
            str(self.workdir), os.ttyname(self._slave), secrets.token_hex(16),
            *map(str, binds),
        ]
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._logf, stderr=subprocess.STDOUT,
            # container= makes systemd log to /dev/console and skip host-only setup;
            # a new session keeps the terminal's Ctrl-C (SIGINT = reboot to PID 1) away.
            env={**ENV, "container": "sysbox"}, start_new_session=True,
        )
        _live.append(self)

    def _wait_running(self, deadline: float) -> None:
        assert self._proc is not None
        while not self._pid:
            if self._proc.poll() is not None:
                raise SysboxError(f"setup exited with {self._proc.returncode}")
            kids = _children(self._proc.pid)
            if kids:
                self._pid, self._pid_start = kids[0], _start_time(kids[0])
            elif time.monotonic() > deadline:
                raise SysboxError("timed out waiting for the box's PID 1")
            else:
                time.sleep(0.01)
        # Before the exec, PID 1 is still the setup shell, with the host's root: never
        # nsenter it then.
        state = ""
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise SysboxError(f"box exited with {self._proc.returncode} during boot")
            if self._comm() != "systemd":
                time.sleep(0.02)
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                r = self.run("systemctl", "is-system-running", "--wait", check=False,
                             timeout=max(0.1, deadline - time.monotonic()))
                state = r.stdout.strip()
                if state in ("running", "degraded"):
                    self.state = state
                    return
            time.sleep(0.05)  # not listening yet ("offline")
        raise SysboxError(f"boot timed out (is-system-running: {state or 'no answer'})")

    def _comm(self) -> str:
        try:
            with open(f"/proc/{self._pid}/comm", encoding="utf-8") as f:
                return f.read().strip()
        except OSError:
            return ""

    def _log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def run(
        self,
        *argv: str,
        check: bool = True,
        input: bytes | None = None,
        user: str | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the box (as root, or as user), like subprocess.run(text=True)."""
        if not self._pid or self._proc is None or self._proc.poll() is not None:
            raise SysboxError("the box is not running")
        # -r -w: without them the command would see the HOST's files (docs/field-notes.md).
        cmd = [_tool("nsenter"), "-t", str(self._pid), "-m", "-u", "-i", "-n", "-p", "-C",
               "-r", "-w", "--"]
        if user is not None:
            # setpriv, not runuser/su: no PAM session, no logind, just the user's ids.
            cmd += ["/bin/sh", "-c",
                    'exec setpriv --reuid="$0" --regid="$(id -g -- "$0")" --init-groups '
                    '--reset-env -- "$@"', user]
        cmd += argv
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
            # Its own process group, so a timeout kills what it started inside too.
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        result = subprocess.CompletedProcess(
            list(argv), proc.returncode,
            out.decode(errors="replace"), err.decode(errors="replace"),
        )
        if check and result.returncode != 0:
            e = subprocess.CalledProcessError(result.returncode, list(argv), result.stdout,
                                              result.stderr)
            e.add_note(f"stdout: {result.stdout.strip()}\nstderr: {result.stderr.strip()}")
            raise e
        return result

    def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Write a root-owned file inside the box, creating its parent directories."""
        if not path.startswith("/"):
            raise ValueError(f"{path!r}: not an absolute path")
        # Written from inside: a host-side path through /proc/PID/root would follow the
        # box's absolute symlinks on the host.
        self.run("/bin/sh", "-c",
                 'mkdir -p -- "$(dirname -- "$0")" && (umask 077 && cat > "$0") && '
                 'chmod "$1" -- "$0"', path, f"{mode:o}",
                 input=data.encode() if isinstance(data, str) else data)

    def poweroff(self, timeout: float = 30) -> None:
        """Shut the box down (killing it if it hangs), then remove what boot() created."""
        if self in _live:
            _live.remove(self)
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None and self._comm() == "systemd":
                with contextlib.suppress(Exception):
                    self._run_poweroff(proc)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill(proc)
        self._pid = 0
        self._cleanup()

    def _run_poweroff(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc  # run() needs it for a moment
        try:
            self.run("systemctl", "poweroff", check=False, timeout=10)
        finally:
            self._proc = None

    def _kill(self, proc: subprocess.Popen[bytes]) -> None:
        # Killing the box's PID 1 kills its whole pid namespace; check it is still ours.
        if self._pid and _start_time(self._pid) == self._pid_start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def _cleanup(self) -> None:
        if self._slave >= 0:  # with every slave end closed, the pump reads EIO and ends
            os.close(self._slave)
            self._slave = -1
        if self._pump is not None:
            self._pump.join(5)
            self._pump = None
        if self._master >= 0:
            os.close(self._master)
            self._master = -1
        if self._logf is not None:
            self._logf.close()
            self._logf = None
        if self._cgroup is not None:
            self._remove_cgroup(self._cgroup)
            self._cgroup = None
        # The mounts lived only in the box's mount namespace, gone with its last process:
        # on the host these are empty directories, so rmdir (never rmtree) is enough.
        for name in ("root", "state"):
            with contextlib.suppress(FileNotFoundError):
                (self.workdir / name).rmdir()
        self._script.unlink(missing_ok=True)
        if self._created:
            self.log.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.workdir.rmdir()

    @staticmethod
    def _remove_cgroup(cg: pathlib.Path) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                # Left-over cgroups of the box's units, deepest first.
                for sub in sorted((p for p in cg.rglob("*") if p.is_dir()),
                                  key=lambda p: len(p.parts), reverse=True):
                    sub.rmdir()
                cg.rmdir()
                return
            except FileNotFoundError:
                if not cg.exists():
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                # Only the box's processes can be in its cgroup: kill stragglers there.
                with contextlib.suppress(OSError):
                    (cg / "cgroup.kill").write_text("1")
                time.sleep(0.05)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.poweroff()
