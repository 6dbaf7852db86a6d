"""The `upload --host` client's own logic, with no server: sftp quoting, the resume plan,
ssh's errors, --wait's printing and exit codes, and a pip install without systemd-python.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dittohead import early
from dittohead.remote import check_paths
from dittohead.remotewait import report
from dittohead.sftpsend import State, Upload, quote, walk
from dittohead.sshrun import Connection, RemoteError, Ssh, ssh_failure

from .conftest import REPO, Env, free_port


def test_sftp_quoting_keeps_glob_characters_and_refuses_newlines() -> None:
    assert quote(b'a "b" *?[x]') == b'"a \\"b\\" *?[x]"'
    for bad in (b"a\nb", b"a\\b", b"tab\there"):
        with pytest.raises(Exception, match="sftp cannot send"):
            quote(bad)


def test_dot_names_symlinks_and_missing_paths_are_refused_before_connecting(
        tmp_path: Path) -> None:
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "link").symlink_to("/etc/passwd")
    for p, why in ((tmp_path / ".hidden", "starting with '.'"),
                   (tmp_path / "d", "symlinks or special files"),
                   (tmp_path / "nope", "no such file")):
        with pytest.raises(Exception, match=why):
            check_paths([p])


def _upload(tmp_path: Path, state_home: Path) -> Upload:
    os.environ["XDG_STATE_HOME"] = str(state_home)
    ssh = Ssh("h", None, "/nonexistent")
    return Upload(ssh, b"s1/inbox", b"e", walk(tmp_path / "e"), "key")


def test_resume_plan_skips_whole_files_appends_to_the_cut_one_and_resends_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    e = tmp_path / "e"
    (e / "sub").mkdir(parents=True)
    for n in ("a", "b", "c", "sub/d"):
        (e / n).write_bytes(n.encode() * 1000)
    up = _upload(tmp_path, tmp_path / "state")
    lines, owners = up.commands(None)
    assert [f.rel for f in owners if f] == [b"a", b"b", b"c", b"sub/d"]
    assert lines[:2] == [b'-mkdir "s1/inbox/.e"', b'chmod 700 "s1/inbox/.e"']
    # An attempt that sent a whole and was cut off in b.
    up.state.done = {b"a".hex()}
    up.state.current = b"b".hex()
    up.state.save()
    (e / "c").write_bytes(b"changed")  # c changed since: sent whole again
    (e / "gone").write_bytes(b"x")
    up = _upload(tmp_path, tmp_path / "state")
    lines, _ = up.commands(500)  # the server holds 500 bytes of b
    sends = [x for x in lines if x.startswith((b"put", b"reput"))]
    assert sends == [b'reput -p "' + os.fsencode(e) + b'/b" "s1/inbox/.e/b"',
                     b'put -p "' + os.fsencode(e) + b'/c" "s1/inbox/.e/c"',
                     b'put -p "' + os.fsencode(e) + b'/gone" "s1/inbox/.e/gone"',
                     b'put -p "' + os.fsencode(e) + b'/sub/d" "s1/inbox/.e/sub/d"']
    # b changed after the cut: its bytes on the server are not its start any more.
    up.state.current = b"b".hex()
    up.state.done = {b"a".hex()}
    up.state.save()
    (e / "b").write_bytes(b"new b")
    (e / "gone").unlink()
    up = _upload(tmp_path, tmp_path / "state")
    lines, _ = up.commands(500)
    assert b'-rm "s1/inbox/.e/gone"' in lines
    assert b'put -p "' + os.fsencode(e) + b'/b" "s1/inbox/.e/b"' in lines
    assert not any(x.startswith(b"reput") for x in lines)


def test_state_is_per_upload_and_forgotten(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    s = State("one")
    s.done = {"61"}
    s.save()
    assert State("one").done == {"61"} and not State("two").found
    State("one").forget()
    assert not State("one").found


def test_ssh_errors_say_what_went_wrong() -> None:
    assert "cannot reach" in str(ssh_failure("h", "ssh: connect to host h port 22: "
                                                  "Connection refused"))
    assert "refused the login" in str(ssh_failure("h", "u@h: Permission denied (publickey)."))
    assert "host key" in str(ssh_failure("h", "Host key verification failed."))
    with pytest.raises(RemoteError, match="not a host"):
        Connection("-oProxyCommand=x", None)


def test_wait_prints_each_outcome_and_exits_with_the_worst(
        capsys: pytest.CaptureFixture[str]) -> None:
    ok = {"id": "1", "entry": "a", "outcome": "delivered", "files": 2, "bytes": 9,
          "destination": "/d"}
    bad = {"id": "2", "entry": "b", "outcome": "failed", "reason": "conflict: x"}
    no = {"id": "3", "entry": "c", "outcome": "rejected", "reason": "not an uploader"}
    wait = {"id": "4", "entry": "d", "outcome": "pending", "reason": "no space"}
    assert report(["a"], {"a": ok}, 5) == 0
    assert report(["a", "b", "d"], {"a": ok, "b": bad, "d": wait}, 5) == 65
    assert report(["b", "c"], {"b": bad, "c": no}, 5) == 77
    assert report(["d", "e"], {"d": wait}, 5) == 75
    out = capsys.readouterr().out
    assert "a: delivered: 2 files, 9 bytes to /d (1)" in out
    assert "b: failed: conflict: x (2)" in out
    assert "d: no outcome after 5 s: not delivered yet: no space" in out
    assert "e: no outcome after 5 s" in out


@pytest.mark.slow
def test_client_installs_and_runs_without_systemd_python(tmp_path: Path) -> None:
    """pip install (no extra) into a fresh venv without system site packages."""
    src = tmp_path / "src"
    subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "-o",
                    str(tmp_path / "src.tar"), "HEAD"], check=True)
    src.mkdir()
    subprocess.run(["tar", "-xf", str(tmp_path / "src.tar"), "-C", str(src)], check=True)
    for f in ("dittohead", "pyproject.toml"):  # the working tree's, committed or not
        subprocess.run(["cp", "-a", str(REPO / f), str(src)], check=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    r = subprocess.run([py, "-m", "pip", "install", "-q", str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert subprocess.run([py, "-c", "import systemd"], capture_output=True).returncode != 0
    dh = str(venv / "bin" / "dittohead")
    r = subprocess.run([dh, "upload", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "--host" in r.stdout, r.stderr
    (tmp_path / "entry").mkdir()
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"Host lab\n  HostName 127.0.0.1\n  Port {free_port()}\n")
    r = subprocess.run([dh, "upload", "--host", "lab", "--ssh-config", str(cfg), "s1",
                        str(tmp_path / "entry")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 69, r.stdout + r.stderr
    assert "cannot reach lab" in r.stderr and "Traceback" not in r.stderr


def test_where_says_which_names_wait_and_which_rsync_the_server_has(env: Env) -> None:
    """What `upload --host` learns in one start-up on the server, before sending."""
    env.drop("taken", {"a": b"1"})
    data = json.loads(env.run("where", "--json", "s1", "taken", "free", check=True).stdout)
    assert data["waiting"] == ["taken"]
    assert data["inbox"] == str(env.study.inbox)
    assert data["rsync"] is None or data["rsync"][0].isdigit()
    r = env.run("where", "--json", "s1", ".hidden")
    assert r.returncode == 2 and "not an entry name" in r.stderr


def test_ready_on_go_renames_only_when_told(env: Env) -> None:
    """`upload --host` starts `ready --on-go` with its transfer: end of input (the client
    failed or was killed) must rename nothing."""
    (env.study.inbox / ".x").write_bytes(b"data")

    def ready(stdin: bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "dittohead", "--config",
                               str(env.config_path), "ready", "--on-go", "s1", "x"],
                              input=stdin, capture_output=True, cwd=REPO, timeout=60)
    r = ready(b"")
    assert r.returncode == 1 and b"not told to go" in r.stderr
    assert (env.study.inbox / ".x").exists() and not (env.study.inbox / "x").exists()
    r = ready(b"go\n")
    assert r.returncode == 0, r.stderr
    assert (env.study.inbox / "x").read_bytes() == b"data"


def test_where_then_ready_answers_on_one_line_then_renames_each_name_asked(env: Env) -> None:
    """`upload --host`'s one process on the server: where's JSON on one line, then a
    rename per `go HEX` line, never replacing; the client's first line is ignored."""
    (env.study.inbox / ".x y").write_bytes(b"data")
    env.drop("taken", {"a": b"1"})
    (env.study.inbox / ".taken").write_bytes(b"new")
    asks = b"hello\ngo " + b"x y".hex().encode() + b"\ngo " + b"taken".hex().encode() + b"\n"
    r = subprocess.run([sys.executable, "-m", "dittohead", "--config", str(env.config_path),
                        "where", "--json", "--then-ready", "s1", "x y"],
                       input=asks, capture_output=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    first, *answers = r.stdout.decode().splitlines()
    assert json.loads(first)["waiting"] == []
    assert [json.loads(a)["ok"] for a in answers] == [True, False]
    assert json.loads(answers[1])["waits"] is True
    assert (env.study.inbox / "x y").read_bytes() == b"data"
    assert (env.study.inbox / ".taken").read_bytes() == b"new"


def test_early_login_is_exactly_the_one_the_session_would_start(tmp_path: Path) -> None:
    (tmp_path / "run 1").mkdir()
    (tmp_path / "it's.txt").write_text("x")
    argv = ["--config=/x", "upload", "s1", str(tmp_path / "run 1") + "/", "--wait",
            "--host", "ra@lab", str(tmp_path / "it's.txt"), "--ssh-config=/cfg", "--timeout", "9"]
    found = early._scan(argv)
    assert found == ("ra@lab", "/cfg", "s1", [str(tmp_path / "run 1") + "/",
                                             str(tmp_path / "it's.txt")])
    host, config, study, paths = found
    names = [n for n in (early._name(p) for p in paths) if n is not None]
    assert names == check_paths([Path(p) for p in paths]) == ["run 1", "it's.txt"]
    ssh = Ssh(host, config, "/tmp/dh-ssh-x/cm")
    session = ["dittohead", "where", "--json", "--then-ready", study, *names]
    assert early.ssh_argv(host, config, "/tmp/dh-ssh-x/cm", study, names) == \
        ssh.master_argv(session)


def test_early_login_only_for_plain_upload_host_command_lines(tmp_path: Path) -> None:
    p = str(tmp_path)
    for argv in (["upload", "s1", p], ["status"], ["upload", "--host", "h", "s1"],
                 ["upload", "--ho", "h", "s1", p], ["upload", "-h"],
                 ["--configx", "upload", "--host", "h", "s1", p], ["upload", "s1", p, "--host"]):
        assert early._scan(argv) is None, argv
    assert early._scan(["upload", "--host=h", "--", "s1", "-p"]) == ("h", None, "s1", ["-p"])
    # Names the upload refuses get no early login: the command says why.
    (tmp_path / ".dot").mkdir()
    assert early._name(str(tmp_path / ".dot")) is None
    assert early._name(str(tmp_path / "missing")) is None
    assert early._name(str(tmp_path / "sub" / "..")) is None


def test_early_login_the_command_does_not_adopt_is_ended(tmp_path: Path) -> None:
    """A symlink inside is refused after the login began: ssh ends, its directory goes."""
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "link").symlink_to("/etc/passwd")
    port = free_port()  # nothing listens: ssh fails, or is ended first
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"Host lab\n  HostName 127.0.0.1\n  Port {port}\n  BatchMode yes\n")
    before = set(os.listdir("/tmp"))
    r = subprocess.run([sys.executable, "-m", "dittohead", "upload", "--host", "lab",
                        "--ssh-config", str(cfg), "s1", str(tmp_path / "e")],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "symlinks or special files" in r.stderr, r.stderr
    assert not {n for n in set(os.listdir("/tmp")) - before if n.startswith("dh-ssh-")}
