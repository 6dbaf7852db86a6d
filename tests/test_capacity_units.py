"""Out of space on a booted systemd: the sandboxed service tells it once, the mailer sends
it, and the delivery after space is freed is told again."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dittohead.log import MESSAGE_IDS

from .boxes import ROOT, SMTP_PORT, Box, boot_installed
from .conftest import wait_for

pytestmark = [pytest.mark.systemd, pytest.mark.slow]
DEST = f"{ROOT}/study/s4"  # s4 is the study that mails pi@example.edu (tests/boxes.py)


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    b = boot_installed(tmp_path_factory.mktemp("capacity-box", numbered=True))
    try:
        yield b
    finally:
        b.box.poweroff()


def _sink(box: Box) -> str:
    return box.sh("journalctl -u sbx-smtp -o cat --no-pager", check=False).stdout


def _events(box: Box, kind: str) -> list[dict[str, object]]:
    return box.journal(f"MESSAGE_ID={MESSAGE_IDS[kind]}", "DITTOHEAD_STUDY=s4")


def test_out_of_space_in_the_sandbox_is_mailed_once_then_delivered(box: Box) -> None:
    box.sh(f"systemd-run -q --unit=sbx-smtp -p Environment=PYTHONWARNINGS=ignore "
           f"/usr/bin/python3 -u -m smtpd -n -c DebuggingServer 127.0.0.1:{SMTP_PORT}")
    # A destination of 4 MiB, 1 MiB of it free, for an entry of 2 MiB.
    box.sh(f"""set -e
mount -t tmpfs -o size=4m,mode=0755 dittohead-test {DEST}
dittohead setup s4 >/dev/null
dd if=/dev/zero of={DEST}/.hog bs=4k 2>/dev/null || true
truncate -s $(( $(stat -c %s {DEST}/.hog) - 1048576 )) {DEST}/.hog
systemctl enable --now dittohead@s4.path
""")
    box.upload("s4", [("big", {"big.dat": 2 << 20})])
    wait_for(lambda: len(_events(box, "out-of-space")) == 1, 60, "the out-of-space event")
    wait_for(lambda: "out of space: big waits" in _sink(box), 60, "the mail in the sink")
    [event] = _events(box, "out-of-space")
    assert event["DITTOHEAD_DESTINATION"] == DEST and event["DITTOHEAD_ENTRY"] == "big"
    assert "waits, 1.0 MB free on" in str(event["MESSAGE"]), event
    # The timer's retries: kept again, told no more.
    for _ in range(2):
        box.wait_inactive("dittohead@s4.service")
        box.sh("systemctl start dittohead@s4.service", check=False)
    box.wait_inactive("dittohead@s4.service")
    assert len(_events(box, "out-of-space")) == 1
    assert len(_events(box, "retry-later")) >= 3
    assert _sink(box).count("out of space: big waits") == 1
    box.sh(f"rm {DEST}/.hog && systemctl start dittohead@s4.service", check=False)
    assert box.wait_delivered("s4", ["big"]).get("big") == 1, box.debug("s4")
    wait_for(lambda: "after waiting for space" in _sink(box), 60, "the delivered mail")
    status = box.sh("dittohead status s4").stdout
    assert "FULL IN" in status and "forecast: at the last day's rate" in status, status
