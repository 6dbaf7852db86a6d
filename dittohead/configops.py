"""Validation of the operations keys (retention, capacity): config.py's helpers for
keys whose checks are all alike, kept apart so that config.py stays one module."""

from __future__ import annotations

from typing import Any, Protocol

from .settings import DEFAULT_ABANDONED_DAYS, DEFAULT_FAILED_WARN_DAYS, DEFAULT_KEEP_DONE_DAYS


class Problems(Protocol):
    """config.py's validator: collects each problem with its key path."""

    def error(self, key: str, message: str) -> None: ...


MAX_DAYS = 36500.0  # a century: beyond it, a typo


def retention(v: Problems, key: str, raw: dict[str, Any]) -> dict[str, Any]:
    """keep_done_days (null: for ever), abandoned_days, failed_warn_days, purge_abandoned."""
    def days(name: str, default: float, nullable: bool = False) -> float | None:
        value = raw.get(name, default)
        if value is None and nullable:
            return None
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not 0 <= value <= MAX_DAYS):  # (NaN fails this too)
            v.error(f"{key}.{name}", f"must be a number of days from 0 to {MAX_DAYS:.0f}"
                    + (", or null (for ever)" if nullable else ""))
            return default
        return float(value)
    purge = raw.get("purge_abandoned", False)
    if not isinstance(purge, bool):
        v.error(f"{key}.purge_abandoned", "must be true or false")
        purge = False
    return {"keep_done_days": days("keep_done_days", DEFAULT_KEEP_DONE_DAYS, nullable=True),
            "abandoned_days": days("abandoned_days", DEFAULT_ABANDONED_DAYS),
            "failed_warn_days": days("failed_warn_days", DEFAULT_FAILED_WARN_DAYS),
            "purge_abandoned": purge}


def percentages(v: Problems, key: str, value: Any) -> tuple[int, ...]:
    if (not isinstance(value, list)
            or not all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= 100
                       for x in value)):
        v.error(key, "must be a list of whole percentages (1-100)")
        return ()
    return tuple(sorted(set(value)))


MAX_FORECAST_WARN_DAYS = 3650


def forecast_days(v: Problems, key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) \
            or not 1 <= value <= MAX_FORECAST_WARN_DAYS:
        v.error(key, f"must be a whole number of days from 1 to {MAX_FORECAST_WARN_DAYS}, "
                "or null (no forecast warning)")
        return None
    return value
