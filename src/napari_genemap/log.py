"""The package's logging: every module logs to ``logging.getLogger(__name__)`` under "napari_genemap".

A library configures nothing (the application owns the handlers); processes this package starts itself
(the tile service's child, the ``genemap`` command) call `configure_logging` once, so
``GENEMAP_LOG_LEVEL=DEBUG`` shows what the engine and the service are doing on stderr.
"""

from __future__ import annotations

import logging
import os

ROOT = "napari_genemap"
LEVEL_VARIABLE = "GENEMAP_LOG_LEVEL"
DEFAULT_LEVEL = "WARNING"


def log_level() -> int:
    """The level ``GENEMAP_LOG_LEVEL`` names (a name such as DEBUG, or a number); WARNING when unset or
    not a level (a typo must not stop the program that reads it)."""
    value = os.environ.get(LEVEL_VARIABLE, DEFAULT_LEVEL).strip().upper()
    if value.isdigit():
        return int(value)
    level = logging.getLevelName(value)
    return level if isinstance(level, int) else logging.WARNING


def configure_logging() -> None:
    """A stderr handler on the root logger (if it has none yet) and the package's level from the
    environment; other libraries' loggers keep the root's WARNING."""
    logging.basicConfig(format="%(asctime)s %(name)s[%(process)d] %(levelname)s: %(message)s")
    logging.getLogger(ROOT).setLevel(log_level())
