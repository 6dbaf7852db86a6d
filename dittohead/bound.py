"""The paths a study's unit was started with, against those the config names now.

dittohead-generator writes the study's dropbox directory and destination into
the service's drop-in twice: as the BindPaths= of its sandbox, and as the
environment variables below. A config edited without `systemctl daemon-reload`
(a destination moved) leaves the unit binding the old paths: the new
destination is then missing from the sandbox, or is a read-only directory of
its empty root. `process` compares first and says so, instead of failing on
what the stale sandbox does.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError
from .settings import StudyConfig

ROOT_ENV = "DITTOHEAD_BOUND_ROOT"
DESTINATION_ENV = "DITTOHEAD_BOUND_DESTINATION"


def check(study: StudyConfig) -> None:
    """Raise ConfigError (exit 78) when the unit was started for other paths."""
    for env, what, now in ((DESTINATION_ENV, "destination", study.destination),
                           (ROOT_ENV, "dropbox directory", study.root)):
        bound = os.environ.get(env)
        if bound is not None and Path(bound) != now:
            raise ConfigError(f"the config's {what} {now} is not the one this unit was "
                              f"started with ({bound}): run systemctl daemon-reload")
