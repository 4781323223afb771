"""The ``memopt`` logger and its environment switch.

``MEMOPT_LOGS`` switches on memopt's logs on stderr: ``1``/``info`` for one line per
region and per pass that changed something, ``debug`` for everything (including
tracebacks of passes that fell back). Without it memopt logs nothing of its own
accord; applications can still configure the ``memopt`` logger as they like.
"""

from __future__ import annotations

import logging
import os

__all__ = ["configure_from_env"]

_LEVELS = {"1": logging.INFO, "info": logging.INFO, "debug": logging.DEBUG, "warning": logging.WARNING}
_configured: str | None = None


def configure_from_env() -> None:
    """Apply ``$MEMOPT_LOGS`` to the ``memopt`` logger (once per distinct value)."""
    global _configured
    value = os.environ.get("MEMOPT_LOGS", "").strip().lower()
    if value == _configured:
        return
    _configured = value
    logger = logging.getLogger("memopt")
    if not value or value == "0":
        return
    level = _LEVELS.get(value)
    logger.setLevel(logging.INFO if level is None else level)
    if not any(getattr(h, "_memopt", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[memopt %(levelname)s] %(message)s"))
        handler._memopt = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    if level is None:  # after the handler exists, so that it carries memopt's prefix
        logger.warning("MEMOPT_LOGS=%r not understood; use one of %s (logging at info)", value, sorted(_LEVELS))
