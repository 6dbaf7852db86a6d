"""Tell people by email: deliveries, failures, rejections, a filling disk.

Mail is a courtesy on top of the journal, which stays the record: a mail
that cannot be sent (no MTA, a refused address) is kept and retried, and
never fails or delays a delivery. Messages are first queued as files in
`processing/.mail/`, then sent over SMTP (never through a setgid sendmail,
which NoNewPrivileges= forbids) to `notify.smtp` (default localhost:25,
where a local MTA such as postfix or nullmailer relays them).

Who sends: `dittohead process` run by hand sends its queue at the end of
the run. Under systemd the delivery service has no network at all
(DITTOHEAD_MAIL=queue in its unit); dittohead-mail@STUDY.service, which has
network to the SMTP host but no capabilities and can write only the queue,
sends it (`dittohead mail STUDY`) after each successful run.

Who gets what: the study's `notify.to` for the events in its `notify.on`,
and, when `notify.uploader_address` is set, the uploader for the outcome of
their own delivery (delivered, failed, rejected), whatever `on` says.
"""

from __future__ import annotations

import os
import socket
import syslog
import time
from pathlib import Path
from typing import Any

from . import log
from .config import Config, StudyConfig
from .faults import point
from .fsops import write_atomic

SMTP_TIMEOUT = 20  # seconds; a hung MTA must not hold up the inbox for long
UPLOADER_EVENTS = ("delivered", "failed", "rejected", "out-of-space", "undone")
# Mail kinds that are told to the contacts under another notify.on event.
ON_EVENT = {"out-of-space": "disk"}


def recipients(cfg: Config, study: StudyConfig, kind: str, uploader: str | None,
               contacts: bool = False) -> list[str]:
    """The addresses that hear of this event (may be empty); contacts: the study's
    contacts hear of it whatever notify.on says."""
    to = list(study.notify.to) if contacts or ON_EVENT.get(kind, kind) in study.notify.on \
        else []
    template = cfg.notify.uploader_address
    # A numeric uploader has no user name, so no address can be made for it.
    if template and uploader and not uploader.isdigit() and kind in UPLOADER_EVENTS:
        address = template.format(user=uploader)
        if address not in to:
            to.append(address)
    return to


def queue_dir(study: StudyConfig) -> Path:
    return study.processing / ".mail"


def send(cfg: Config, study: StudyConfig, kind: str, subject: str, body: str,
         uploader: str | None = None, contacts: bool = False, name: str = "",
         owner: tuple[int, int] | None = None) -> bool:
    """Queue one event's mail for whoever should hear of it; whether one was queued.

    `name`: the queue file's name (without .eml) for a mail that a resumed run may queue
    again (a filed entry's): queued again, it replaces itself instead of going out twice.
    Never raises: the event it tells of has happened already, so a mail that
    cannot be made or queued is a warning naming why, and nothing else.
    owner: (uid, gid) the queue and the mail are given to (root's `undo`
    queues for the service user, whose mail unit sends the queue).
    """
    try:
        to = recipients(cfg, study, kind, uploader, contacts)
        data = message(cfg, study, to, subject, body) if to else None
    except ValueError as e:  # a header the email policy refuses
        _warn(study, f"could not make the mail about {kind}: {e}")
        return False
    if data is None:
        return False
    try:
        q = queue_dir(study)
        q.mkdir(mode=0o700, exist_ok=True)
        point("mailing")
        path = q / f"{name or f'{time.time_ns()}-{os.urandom(4).hex()}'}.eml"
        write_atomic(path, data, 0o600)
        if owner is not None:
            os.chown(q, *owner, follow_symlinks=False)
            os.chown(path, *owner, follow_symlinks=False)
        point("mail-queued")
    except OSError as e:
        _warn(study, f"could not queue mail about {kind}: {e}")
        return False
    return True


def message(cfg: Config, study: StudyConfig, to: list[str], subject: str,
            body: str) -> bytes | None:
    """The mail as queued, or None when no address is left; ValueError for a bad header.

    Headers are made by the email package's policy, which refuses a line
    break in any of them; subject and body are escaped first (log.clean),
    and an address that does not parse as exactly one address is left out.
    """
    # Imported here, like smtplib below: most runs send no mail, and every
    # run's start-up time is part of each delivery's latency.
    from email.message import EmailMessage
    from email.policy import default
    from email.utils import formatdate, make_msgid

    good = [a for a in to if _one_address(study, a)]
    if not good:
        return None
    msg = EmailMessage(policy=default)
    msg["From"] = cfg.notify.sender or f"{cfg.service_user}@{socket.getfqdn()}"
    msg["To"] = ", ".join(good)
    msg["Subject"] = " ".join(log.clean(f"[dittohead {study.name}] {subject}").splitlines())
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain="dittohead.invalid")
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies
    for name, value in msg.items():
        if getattr(value, "defects", None):
            raise ValueError(f"its {name} header '{log.printable(str(value))}': "
                             f"{value.defects[0]}")
    msg.set_content(log.clean(body))
    return msg.as_bytes()


def _one_address(study: StudyConfig, text: str) -> bool:
    """Whether text is one well-formed address; warn about it when not."""
    from email.headerregistry import HeaderRegistry

    try:
        header = HeaderRegistry()("To", text)
        found: tuple[Any, ...] = getattr(header, "addresses", ())  # an AddressHeader's
        ok = (text.isprintable() and not header.defects and len(found) == 1
              and bool(found[0].username and found[0].domain))
    except (ValueError, IndexError):  # the parser's own errors on some malformed input
        ok = False
    if not ok:
        _warn(study, f"not mailing '{log.printable(text)}': not one valid address")
    return ok


def _warn(study: StudyConfig, text: str) -> None:
    log.send(f"{study.name}: {text}", priority=syslog.LOG_WARNING,
             DITTOHEAD_STUDY=study.name, DITTOHEAD_REASON=text)


def send_queued(cfg: Config, study: StudyConfig) -> int:
    """Send every queued mail, oldest first; return how many are still queued."""
    try:
        queued = sorted(p for p in queue_dir(study).iterdir() if p.suffix == ".eml")
    except FileNotFoundError:
        return 0
    if not queued:
        return 0
    import smtplib
    import ssl
    from email import message_from_bytes

    smtp = cfg.notify.smtp
    try:
        with smtplib.SMTP(smtp.host, smtp.port, timeout=SMTP_TIMEOUT) as s:
            if smtp.starttls:
                s.starttls(context=ssl.create_default_context())
            if smtp.username:
                assert smtp.password_file is not None  # config validation demands it
                s.login(smtp.username, smtp.password_file.read_text().strip())
            for i, path in enumerate(queued):
                msg = message_from_bytes(path.read_bytes())
                try:
                    s.send_message(msg)
                except smtplib.SMTPRecipientsRefused as e:
                    # Permanent for this message: keeping it would block the rest.
                    log.send(f"{study.name}: mail {path.name} refused by the server, "
                             f"dropped: {e}", priority=syslog.LOG_WARNING,
                             DITTOHEAD_STUDY=study.name, DITTOHEAD_REASON=str(e))
                path.unlink()
                queued[i] = Path()
    except (OSError, smtplib.SMTPException) as e:
        left = sum(1 for p in queued if p != Path())
        log.send(f"{study.name}: could not send {left} queued mails via {smtp.host}:"
                 f"{smtp.port}, kept for the next run: {e}", priority=syslog.LOG_WARNING,
                 DITTOHEAD_STUDY=study.name, DITTOHEAD_REASON=str(e))
        _record_failure(study, f"{smtp.host}:{smtp.port}", str(e), left)
        return left
    try:
        (queue_dir(study) / LAST_ERROR).unlink(missing_ok=True)
    except OSError:
        pass  # check would name a failure that is over; the next send tries again
    return 0


# In the queue directory: the last failed attempt to send, so that `dittohead check`
# says so at once (the queue alone only looks stale after a day). Removed once the
# queue is sent.
LAST_ERROR = ".last-error.json"


def _record_failure(study: StudyConfig, server: str, error: str, left: int) -> None:
    import json
    from datetime import UTC, datetime
    at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    data = {"at": at, "server": server, "error": error, "queued": left}
    try:
        write_atomic(queue_dir(study) / LAST_ERROR, json.dumps(data).encode() + b"\n", 0o640)
    except OSError as e:  # the journal has the failure already
        _warn(study, f"could not record the mail failure: {e}")


def failed_send(study: StudyConfig, queued: int) -> str | None:
    """What `check` says of the last failed send recorded in the queue, or None (none, or
    not readable by the caller)."""
    import json
    try:
        data = json.loads((queue_dir(study) / LAST_ERROR).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    at, server, error = (log.printable(str(data.get(k))) for k in ("at", "server", "error"))
    return (f"mail could not be sent at {at} via {server}: {error}; {queued} mails wait in "
            f"the queue (journalctl -u dittohead-mail@{study.name}.service; once the server "
            f"is back: systemctl start dittohead-mail@{study.name})")
