"""How the command-line entry points end on an expected error: one line, no traceback."""

from __future__ import annotations

import logging
import sys
from typing import Any, NoReturn, Sequence


def fail(log: logging.Logger, exc: BaseException, code: int, prog: str = "busiseg", prefix: str = "error: ",
         level: int = logging.ERROR) -> NoReturn:
    """Log ``exc``, print ``<prog>: <prefix><exc>`` to stderr and exit with ``code``."""
    log.log(level, "%s", exc)
    print(f"{prog}: {prefix}{exc}", file=sys.stderr)
    sys.exit(code)


def require(cfg: Any, keys: Sequence[str], usage: str, error: type[Exception] = ValueError) -> list[Any]:
    """The values of ``keys`` in ``cfg``; any left unset (``???``, null or empty) are named together in one
    ``error``, with the command's ``usage`` line."""
    from omegaconf import OmegaConf

    missing = [k for k in keys if OmegaConf.is_missing(cfg, k) or cfg.get(k) in (None, "")]
    if missing:
        raise error(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; usage: {usage}")
    return [cfg[k] for k in keys]
