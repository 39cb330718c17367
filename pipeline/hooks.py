"""A test hook for crash tests: stop a process at a named point so a test can kill it there."""

import os
import time

HOLD_ENV = "QKATLAS_HOLD_AT"
HOLD_MARKER_ENV = "QKATLAS_HOLD_MARKER"


def hold(point: str) -> None:
    """With QKATLAS_HOLD_AT=point in the environment, touch the file named by QKATLAS_HOLD_MARKER
    and block for good (a test then SIGKILLs the process there). Does nothing otherwise."""
    if os.environ.get(HOLD_ENV) != point:
        return
    marker = os.environ.get(HOLD_MARKER_ENV)
    if marker:
        with open(marker, "w") as handle:
            handle.write(f"{os.getpid()} {point}\n")
    while True:
        time.sleep(60)
