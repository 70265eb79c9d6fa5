"""One line when a long phase starts and one with its time when it ends, so no step runs silent for minutes."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def phase(what: str) -> Iterator[None]:
    log.info("%s ...", what)
    started = time.perf_counter()
    yield
    log.info("%s: done in %.1f s", what, time.perf_counter() - started)
