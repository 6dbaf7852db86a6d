"""Who may run which command (docs/contract.md, "Commands"): anyone else gets a sentence
naming who may, and exit 77, before the command touches anything.

Three kinds of caller. ROOT: only root (`setup` sets owners). SERVICE: root or
the service user (what the units run, and `retry`, which moves files of the
service's own directories). ADMIN: those, or a member of the service user's
group (`check`, `status`: they read receipts and the layout). Commands not
listed here (`upload`, `where`, `ready`, `status --mine`) are for any user.
A command another part of dittohead adds picks its kind in WHO.
"""

from __future__ import annotations

import os
import pwd
from enum import Enum

from .errors import NotPermitted


class Who(Enum):
    ROOT = "root"
    SERVICE = "service"
    ADMIN = "admin"


WHO: dict[str, Who] = {
    "process": Who.SERVICE,
    "mail": Who.SERVICE,
    "retry": Who.SERVICE,
    "purge": Who.SERVICE,
    "metrics": Who.SERVICE,
    "undo": Who.SERVICE,
    "setup": Who.ROOT,
    "check": Who.ADMIN,
    "status": Who.ADMIN,
}

# What to try instead, by command.
HINT = {
    "status": "; your own uploads: dittohead status --mine",
    "check": "; your own uploads: dittohead status --mine",
}


def may_run(kind: Who, service_user: str) -> bool:
    """Whether the calling process is of that kind."""
    euid = os.geteuid()
    if euid == 0:
        return True
    if kind is Who.ROOT:
        return False
    try:
        svc = pwd.getpwnam(service_user)
    except KeyError:
        return False  # no service user yet: only root can set things up
    if euid == svc.pw_uid:
        return True
    return kind is Who.ADMIN and (os.getegid() == svc.pw_gid or svc.pw_gid in os.getgroups())


def who_may(kind: Who, service_user: str) -> str:
    """The callers of a kind, in words."""
    if kind is Who.ROOT:
        return "root"
    if kind is Who.SERVICE:
        return f"root or the service user {service_user}"
    try:
        import grp
        group = grp.getgrgid(pwd.getpwnam(service_user).pw_gid).gr_name
    except KeyError:
        group = service_user
    return f"root, the service user {service_user} or members of the group {group}"


def require(command: str, service_user: str) -> None:
    """Raise NotPermitted (exit 77) when the caller may not run this command."""
    kind = WHO.get(command)
    if kind is None or may_run(kind, service_user):
        return
    try:
        me = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        me = f"uid {os.geteuid()}"
    raise NotPermitted(f"dittohead {command} is for {who_may(kind, service_user)}; you are "
                       f"{me}{HINT.get(command, ': run it with sudo')}")
