"""config.yaml: the documented example validates; every error is reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dittohead import config
from dittohead.cli import main
from dittohead.errors import ConfigError

from .conftest import REPO


def test_repo_example_config_validates() -> None:
    cfg = config.load(REPO / "config.yaml")
    s = cfg.study("nccam3")
    assert s.destination == Path("/study/nccam3/raw-data")
    assert s.file_mode == 0o640 and s.dir_mode == 0o2750
    assert s.uploaders == ("nccam3-ra",)
    assert s.inbox == Path("/data-dropbox/nccam3/inbox")
    assert cfg.notify.uploader_address == "{user}@example.edu"


def test_defaults_apply_when_keys_are_omitted() -> None:
    cfg = config.parse({"studies": {"a1": {"destination": "/srv/a1"}}})
    assert cfg.dropbox_root == Path("/data-dropbox")
    assert cfg.service_user == "dittohead"
    s = cfg.study("a1")
    assert s.group is None and s.uploaders is None
    assert s.ignore == config.DEFAULT_IGNORE
    assert s.disk_warn_percent == (90, 95)


def test_study_keys_override_defaults() -> None:
    cfg = config.parse({"defaults": {"file_mode": "0600", "ignore": []},
                        "studies": {"a1": {"destination": "/srv/a1", "file_mode": "0644"}}})
    assert cfg.study("a1").file_mode == 0o644
    assert cfg.study("a1").ignore == ()


def test_every_error_is_reported_with_its_key_path() -> None:
    bad = {
        "dropbox_root": "relative/path",
        "colour": "blue",
        "defaults": {"destination": "/x"},
        "notify": {"smtp": {"port": "25"}},
        "studies": {
            "Bad-Name": {"destination": "/x"},
            "ok1": {"destination": "not/absolute", "file_mode": 640, "dir_mode": "0555"},
            "ok2": {"file_mode": "4755", "notify": {"on": ["sometimes"]}},
        },
    }
    with pytest.raises(ConfigError) as e:
        config.parse(bad, Path("/etc/dittohead/config.yaml"))
    text = str(e.value)
    for expected in [
        "dropbox_root: must be an absolute path",
        "colour: unknown key",
        "defaults.destination: each study needs its own destination",
        "notify.smtp.port: must be a port number",
        "studies.Bad-Name: study id must match",
        "studies.ok1.destination: must be an absolute path",
        'studies.ok1.file_mode: must be a quoted octal string like "0640"',
        "studies.ok1.dir_mode: must give the owner rwx",
        "studies.ok2.destination: is required",
        "studies.ok2.file_mode: setuid, setgid and sticky bits are not allowed",
        "studies.ok2.notify.on[0]: unknown event",
    ]:
        assert expected in text, f"missing {expected!r} in:\n{text}"
    assert text.startswith("/etc/dittohead/config.yaml: 11 problems")


def test_overlapping_destinations_are_refused() -> None:
    with pytest.raises(ConfigError) as e:
        config.parse({"dropbox_root": "/srv/box", "studies": {
            "a": {"destination": "/study/a"},
            "b": {"destination": "/study/a/sub"},
            "c": {"destination": "/srv/box/c"},
        }})
    assert "studies.b.destination: overlaps the destination of study a" in str(e.value)
    assert "studies.c.destination: must not overlap dropbox_root" in str(e.value)


def test_bad_yaml_and_missing_file_exit_78(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("studies: [unclosed\n")
    assert main(["--config", str(p), "process", "x"]) == 78
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml"), "process", "x"]) == 78


def test_unknown_study_is_a_config_error(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"studies": {"a1": {"destination": "/srv/a1"}}}))
    assert main(["--config", str(p), "process", "zz"]) == 78


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["process"]) == 2
    assert main(["frobnicate"]) == 2


def test_config_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DITTOHEAD_CONFIG", str(tmp_path / "x.yaml"))
    assert config.config_path(None) == tmp_path / "x.yaml"
    assert config.config_path("/a.yaml") == Path("/a.yaml")
    monkeypatch.delenv("DITTOHEAD_CONFIG")
    assert config.config_path(None) == Path("/etc/dittohead/config.yaml")


def test_paths_that_unit_files_would_need_escaped_are_refused() -> None:
    with pytest.raises(ConfigError) as e:
        config.parse({"dropbox_root": "/data dropbox",
                      "studies": {"a": {"destination": "/study/50%"},
                                  "b": {"destination": "/study/caf\u00e9"}}})
    for key in ("dropbox_root", "studies.a.destination", "studies.b.destination"):
        assert f"{key}: may hold only letters" in str(e.value)
