"""How the command-line entry points end on an expected error: one line, no traceback."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn


def fail(log: logging.Logger, exc: BaseException, code: int, prog: str = "busiseg", prefix: str = "error: ",
         level: int = logging.ERROR) -> NoReturn:
    """Log ``exc``, print ``<prog>: <prefix><exc>`` to stderr and exit with ``code``."""
    log.log(level, "%s", exc)
    print(f"{prog}: {prefix}{exc}", file=sys.stderr)
    sys.exit(code)
