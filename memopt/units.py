"""Byte counts as memopt writes them in reports, warnings and errors.

One format everywhere (``"512 B"``, ``"1.50 KiB"``, ``"12.00 MiB"``), so a figure in a
warning can be found in the report. Depends on nothing in memopt: every layer may use
it. Reading sizes the other way (``"6GiB"``) is `memopt.config.parse_size`.
"""

from __future__ import annotations

__all__ = ["format_bytes"]


def format_bytes(n: int | float | None) -> str:
    """``1536`` -> ``"1.50 KiB"``; whole bytes under 1 KiB (``"512 B"``); ``None`` ->
    ``"-"`` (a table cell with no figure)."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"
