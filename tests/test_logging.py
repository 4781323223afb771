"""``MEMOPT_LOGS``: memopt's own log lines on stderr (`memopt._logging`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from memopt import _logging


@pytest.fixture
def fresh_memopt_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[logging.Logger]:
    """The ``memopt`` logger as before any ``MEMOPT_LOGS`` was applied, restored after."""
    logger = logging.getLogger("memopt")
    handlers, level = list(logger.handlers), logger.level
    monkeypatch.setattr(_logging, "_configured", None)
    for h in handlers:
        logger.removeHandler(h)
    yield logger
    for h in list(logger.handlers):
        logger.removeHandler(h)
    for h in handlers:
        logger.addHandler(h)
    logger.setLevel(level)


def test_a_value_not_understood_is_said_with_memopts_prefix(
    fresh_memopt_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``MEMOPT_LOGS=bogus`` was logged before memopt's handler existed, so it came out
    without ``[memopt WARNING]`` (through logging's last-resort handler, or not at all
    where the root logger has handlers). It now carries the prefix, and memopt logs at
    info, as it says."""
    monkeypatch.setenv("MEMOPT_LOGS", "bogus")
    _logging.configure_from_env()
    err = capsys.readouterr().err
    assert "[memopt WARNING] MEMOPT_LOGS='bogus' not understood; use one of" in err, err
    assert fresh_memopt_logger.level == logging.INFO
