"""An admin's first and second day: what `make install` leaves, who may run what (a
sentence and exit 77, never an errno), a failed mail send named by `check` at once, and a
destination moved without `systemctl daemon-reload` named by the run (also on a booted
systemd)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dittohead.config import load

from .boxes import ROOT, UPLOADER, Box, boot_installed
from .conftest import (
    REPO,
    Env,
    Inbox,
    ThrowawayUser,
    add_user,
    as_service,
    free_port,
    mail_env,
    service_argv,
    wait_for,
)


def _install(destdir: Path) -> None:
    r = subprocess.run(["make", "-s", "-f", "packaging/install.mk", "install-files",
                        f"DESTDIR={destdir}", "PREFIX=/usr"],
                       cwd=REPO, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr


def test_install_puts_a_config_without_studies_and_the_example_in_the_docs(
        tmp_path: Path) -> None:
    _install(tmp_path)
    live = tmp_path / "etc/dittohead/config.yaml"
    assert live.read_bytes() == (REPO / "packaging/config.yaml").read_bytes()
    assert load(live).studies == {}
    doc = tmp_path / "usr/share/doc/dittohead"
    assert (doc / "config.yaml.example").read_bytes() == (REPO / "config.yaml").read_bytes()
    for name in ("admin.md", "contract.md", "upload.md", "design.md", "README.md",
                 "examples/dittohead-smb.conf", "examples/dittohead-sshd.conf"):
        assert (doc / name).is_file(), name
    # The admin's own config, and a link to one, are never replaced.
    live.write_text("# mine\nstudies: {}\n")
    _install(tmp_path)
    assert live.read_text() == "# mine\nstudies: {}\n"
    live.unlink()
    live.symlink_to("/nonexistent/config.yaml")
    _install(tmp_path)
    assert live.is_symlink()
    # make uninstall takes the docs along and leaves the config.
    r = subprocess.run(["make", "-s", "-f", "packaging/install.mk", "uninstall",
                        f"DESTDIR={tmp_path}", "PREFIX=/usr"],
                       cwd=REPO, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert not doc.exists() and live.is_symlink()


# --- who may run what -------------------------------------------------------------------

def as_user(env: Env, user: ThrowawayUser, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(service_argv(env, user, *args, caps=None), capture_output=True,
                          text=True, timeout=120, cwd="/")


def no_errno(r: subprocess.CompletedProcess[str]) -> None:
    out = r.stdout + r.stderr
    for raw in ("Errno", "Permission denied", "Traceback"):
        assert raw not in out, out


@pytest.mark.root
def test_commands_run_by_someone_who_may_not_say_who_may_and_exit_77(
        service_env: Env, svc: ThrowawayUser) -> None:
    outsider = add_user("dh-test-ra", groups=("dh-test-uploaders",))
    for args, who in [
        (("check", "s1"), f"root, the service user {svc.name} or members of the group"),
        (("status",), f"root, the service user {svc.name} or members of the group"),
        (("retry", "s1", "20261127T204655Z-x-9f3a0c"), f"root or the service user {svc.name}"),
        (("process", "s1"), f"root or the service user {svc.name}"),
        (("mail", "s1"), f"root or the service user {svc.name}"),
        (("setup", "s1"), "is for root;"),
    ]:
        r = as_user(service_env, outsider, *args)
        assert r.returncode == 77, (args, r.stderr)
        assert f"dittohead {args[0]} is for " in r.stderr and who in r.stderr, r.stderr
        assert "you are dh-test-ra" in r.stderr
        no_errno(r)
    r = as_user(service_env, outsider, "status", "--mine", "s1")
    assert r.returncode == 0, r.stderr


@pytest.mark.root
def test_an_admin_in_the_service_group_checks_but_may_not_retry(
        service_env: Env, svc: ThrowawayUser) -> None:
    admin = add_user("dh-test-admin", groups=(svc.name,))
    r = as_user(service_env, admin, "check", "s1")
    assert r.returncode in (0, 1), r.stderr
    no_errno(r)
    r = as_user(service_env, admin, "status", "--json")
    assert r.returncode == 0, r.stderr
    [s1] = json.loads(r.stdout)
    assert s1["study"] == "s1" and s1["inbox_readable"] is False
    # The table says its pending counts leave the shared inbox out, not "0" alone.
    r = as_user(service_env, admin, "status")
    assert r.returncode == 0 and "only root and the service user can list" in r.stdout
    r = as_user(service_env, admin, "retry", "s1", "20261127T204655Z-x-9f3a0c")
    assert r.returncode == 77
    assert f"dittohead retry is for root or the service user {svc.name}; you are " \
           "dh-test-admin" in r.stderr
    no_errno(r)
    # The service user itself may: the answer is about the delivery, not the caller.
    r = as_user(service_env, svc, "retry", "s1", "20261127T204655Z-x-9f3a0c")
    assert r.returncode == 1 and "no failed delivery" in r.stderr, r.stderr


@pytest.mark.root
def test_retry_by_the_service_user_of_another_users_upload_needs_root(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser) -> None:
    (service_env.study.destination / "a.txt").write_bytes(b"other\n")
    service_env.drop("s01", {"a.txt": b"mine\n"}, uid=ra.uid)
    assert as_service(service_env, svc, "process", "s1").returncode == 0
    [receipt] = service_env.failed_receipts()
    r = as_user(service_env, svc, "retry", "s1", receipt.stem)
    assert r.returncode == 77, r.stderr
    assert "which needs root: run it with sudo; nothing was changed" in r.stderr
    assert (service_env.study.failed / receipt.stem).is_dir()
    assert service_env.run("retry", "s1", receipt.stem).returncode == 0  # as root
    assert (service_env.study.inbox / "s01").stat().st_uid == ra.uid


# --- mail -------------------------------------------------------------------------------

def test_a_failed_mail_send_is_named_by_check_at_once(
        shared_base: Path, smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    env = mail_env(shared_base, free_port())  # nothing listens there
    env.drop("s01", {"a.txt": b"a\n"})
    assert env.process().returncode == 0
    r = env.run("check", "s1")
    assert r.returncode == 1
    line = next(x for x in r.stdout.splitlines() if "mail could not be sent" in x)
    assert "via 127.0.0.1:" in line and "mails wait in the queue" in line, line
    assert "systemctl start dittohead-mail@s1" in line
    # The server is back: the queue goes out and check says nothing more about it.
    data = yaml.safe_load(env.config_path.read_text())
    data["notify"]["smtp"]["port"] = port
    env.config_path.write_text(yaml.safe_dump(data))
    assert env.run("mail", "s1").returncode == 0
    assert len(inbox.messages) == 1  # one message, to the PI and the uploader
    assert "mail could not be sent" not in env.run("check", "s1").stdout


# --- a destination moved without daemon-reload -------------------------------------------

def test_a_run_started_for_another_destination_says_daemon_reload(env: Env) -> None:
    entry = env.drop("s01", {"a.txt": b"a\n"})
    r = env.process(env={"DITTOHEAD_BOUND_ROOT": str(env.study.root),
                         "DITTOHEAD_BOUND_DESTINATION": "/study/old"})
    assert r.returncode == 78, r.stderr
    assert (f"the config's destination {env.study.destination} is not the one this unit "
            "was started with (/study/old): run systemctl daemon-reload") in r.stderr
    assert entry.exists() and env.done_receipts() == []
    r = env.process(env={"DITTOHEAD_BOUND_ROOT": str(env.study.root),
                         "DITTOHEAD_BOUND_DESTINATION": str(env.study.destination)})
    assert r.returncode == 0 and len(env.done_receipts()) == 1, r.stderr


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    b = boot_installed(tmp_path_factory.mktemp("admin-box", numbered=True))
    try:
        yield b
    finally:
        b.box.poweroff()


@pytest.mark.systemd
@pytest.mark.slow
def test_moving_a_destination_without_daemon_reload_is_named(box: Box) -> None:
    old, new = f"{ROOT}/study/s2", f"{ROOT}/study/s2-moved"
    config = box.box.run("cat", "/etc/dittohead/config.yaml").stdout
    box.sh(f"mv {old} {new}")
    box.box.write_file("/etc/dittohead/config.yaml",
                       config.replace(f"destination: {old}\n", f"destination: {new}\n"))
    try:
        box.upload("s2", [("after-move", {"a.txt": 10})])
        since = box.now()
        box.sh("systemctl start dittohead@s2.service", check=False)
        assert box.prop("dittohead@s2.service", "ExecMainStatus") == "78"
        errors = box.journal(f"--since=@{since}", "SYSLOG_IDENTIFIER=dittohead",
                             "DITTOHEAD_REASON=" + (
                                 f"the config's destination {new} is not the one this unit "
                                 f"was started with ({old}): run systemctl daemon-reload"))
        assert errors, box.debug("s2")
        assert box.receipts("s2") == {"done": [], "failed": []}
        box.sh("systemctl daemon-reload; systemctl reset-failed dittohead@s2.service")
        box.sh("systemctl start dittohead@s2.service")
        assert box.delivered("s2") == {"after-move": 1}, box.debug("s2")
        assert box.sh(f"ls {new}").stdout.split() == ["a.txt"]
    finally:
        box.sh(f"mv {new} {old}", check=False)
        box.box.write_file("/etc/dittohead/config.yaml", config)
        box.sh("systemctl daemon-reload; systemctl reset-failed", check=False)


@pytest.mark.systemd
@pytest.mark.slow
def test_check_names_a_failed_send_of_the_mail_unit(box: Box) -> None:
    # s4 mails through 127.0.0.1:2525, where nothing listens in this box.
    box.upload("s4", [("mailed", None)])
    box.sh("systemctl start dittohead@s4.service")
    assert box.delivered("s4") == {"mailed": 1}
    wait_for(lambda: box.sh(f"test -e {ROOT}/dropbox/s4/processing/.mail/.last-error.json",
                            check=False).returncode == 0, 60, "the mailer to record its failure")
    out = box.sh("dittohead check s4", check=False).stdout
    assert "s4: mail could not be sent at " in out and "via 127.0.0.1:2525" in out, out
    # Named as the uploader, who may not run check: a sentence, exit 77.
    r = box.box.run("dittohead", "check", "s4", user=UPLOADER, check=False)
    assert r.returncode == 77 and "dittohead check is for root" in r.stderr, r.stderr
