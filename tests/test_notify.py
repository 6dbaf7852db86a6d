"""Mail on a real SMTP server on 127.0.0.1: who hears of what; a dead MTA loses nothing."""

from __future__ import annotations

import signal
from email.message import Message
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from .conftest import Inbox, free_port, mail_env


def body(m: Message) -> str:
    payload = m.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode()


def test_delivery_mails_the_study_and_the_uploader(shared_base: Path,
                                                   smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    env = mail_env(shared_base, port)
    env.drop("s01-session1", {"eprime/s01.txt": b"x", ".DS_Store": b"junk"})
    r = env.process()
    assert r.returncode == 0, r.stderr
    [(rcpt, m)] = inbox.messages
    uploader = r.stderr.split("DITTOHEAD_UPLOADER=")[1].split()[0].rstrip("]")
    assert rcpt == ["pi@example.edu", f"{uploader}@example.edu"]
    assert m["Subject"] == "[dittohead s1] delivered s01-session1 (1 files)"
    assert m["From"] == "dittohead@example.edu"
    assert m["Auto-Submitted"] == "auto-generated"
    text = body(m)
    assert "Entry:       s01-session1" in text and str(env.study.destination) in text
    assert ".DS_Store" in text


def test_failure_mail_says_why_and_how_to_retry(shared_base: Path,
                                                smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    env = mail_env(shared_base, port)
    (env.study.destination / "a.txt").write_bytes(b"original")
    env.drop("e", {"a.txt": b"other"})
    assert env.process().returncode == 0
    [(_, m)] = inbox.messages
    assert "failed: e was NOT delivered" in str(m["Subject"])
    text = body(m)
    assert "a.txt" in text and "dittohead retry s1 " in text


def test_notify_on_limits_the_study_list_not_the_uploader(shared_base: Path,
                                                          smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    env = mail_env(shared_base, port, on=["failed"])
    env.drop("e", {"a.txt": b"1"})
    assert env.process().returncode == 0
    [(rcpt, _)] = inbox.messages
    assert "pi@example.edu" not in rcpt and len(rcpt) == 1


def test_no_mta_loses_no_data_and_keeps_the_mail(shared_base: Path) -> None:
    env = mail_env(shared_base, free_port())  # nothing listens there
    env.drop("e", {"a.txt": b"1"})
    r = env.process()
    assert r.returncode == 0, r.stderr
    assert (env.study.destination / "a.txt").read_bytes() == b"1"
    assert "could not send 1 queued mails via 127.0.0.1" in r.stderr
    assert len(list((env.study.processing / ".mail").glob("*.eml"))) == 1


def test_the_service_only_queues_and_dittohead_mail_sends(shared_base: Path,
                                                          smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    env = mail_env(shared_base, port)
    env.drop("e1", {"a.txt": b"1"})
    env.drop("e2", {"b.txt": b"2"})
    r = env.process(env={"DITTOHEAD_MAIL": "queue"})  # as dittohead@.service runs it
    assert r.returncode == 0, r.stderr
    assert inbox.messages == []
    assert len(list((env.study.processing / ".mail").glob("*.eml"))) == 2
    r = env.run("mail", "s1")  # as dittohead-mail@.service runs it
    assert r.returncode == 0, r.stderr
    assert sorted(str(m["Subject"]) for _, m in inbox.messages) == [
        "[dittohead s1] delivered e1 (1 files)", "[dittohead s1] delivered e2 (1 files)"]
    assert list((env.study.processing / ".mail").glob("*.eml")) == []


def test_queued_mail_waits_for_the_mta_then_goes(shared_base: Path) -> None:
    port = free_port()
    env = mail_env(shared_base, port)
    env.drop("e", {"a.txt": b"1"})
    assert env.process(env={"DITTOHEAD_MAIL": "queue"}).returncode == 0
    r = env.run("mail", "s1")
    assert r.returncode == 75 and "kept for the next run" in r.stderr
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        assert env.run("mail", "s1").returncode == 0
    finally:
        controller.stop()
    assert len(inbox.messages) == 1


def test_undo_mails_the_contacts_and_the_uploader_once(shared_base: Path,
                                                        smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    env = mail_env(shared_base, port, on=["failed"])  # contacts hear of an undo regardless
    env.drop("e", {"a.txt": b"1"})
    assert env.process().returncode == 0
    inbox.messages.clear()  # the delivery's own mail (to the uploader)
    [receipt] = env.done_receipts()
    delivery = receipt.name.removesuffix(".json")
    r = env.run("undo", "s1", delivery)
    assert r.returncode == 0, r.stderr
    assert "mail about it sent" in r.stdout
    [(rcpt, m)] = inbox.messages
    assert rcpt[0] == "pi@example.edu" and len(rcpt) == 2  # and the uploader
    assert m["Subject"] == f"[dittohead s1] undone: e ({delivery})"
    text = body(m)
    assert "Removed:     1 files" in text and f"dittohead retry s1 {delivery}" in text
    assert env.run("undo", "s1", delivery).returncode == 0  # already undone: no mail again
    assert len(inbox.messages) == 1


@pytest.mark.parametrize("point", ["filed", "mailing", "mail-queued"])
def test_a_run_killed_while_telling_of_an_entry_mails_it_once_and_logs_it_once(
        shared_base: Path, smtp: tuple[Inbox, int], point: str) -> None:
    # The claim is released only once the note, the mail and the event are done: the next
    # run tells of the entry again, and its mail, queued under the same name, replaces
    # the killed run's instead of going out twice.
    inbox, port = smtp
    env = mail_env(shared_base, port)
    env.drop("e1", {"a.txt": b"1"})
    queue = {"DITTOHEAD_MAIL": "queue"}
    r = env.process(env={**queue, "DITTOHEAD_TEST_FAULT": point})
    assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr)
    assert "delivered e1" not in r.stderr
    r = env.process(env=queue)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("s1: delivered e1") == 1, r.stderr
    assert len(env.done_receipts()) == 1 and list(env.study.processing.glob("[!.]*.json")) == []
    assert env.run("mail", "s1").returncode == 0
    assert [str(m["Subject"]) for _, m in inbox.messages] == [
        "[dittohead s1] delivered e1 (1 files)"]
