"""How the command-line entry points end on an expected error: one line, no traceback."""

from __future__ import annotations

import functools
import logging
import re
import sys
from typing import Any, Callable, NoReturn, Sequence

# key=value as Hydra reads it: an optional +, ++ or ~, a dotted key (group@package too)
_OVERRIDE = re.compile(r"^(\+{0,2}|~)([\w.@/-]+)=(.*)$", re.S)


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


def unreadable_override(argv: Sequence[str]) -> str | None:
    """A hint for the first ``key=value`` argument Hydra's override grammar rejects (BUSI's file names hold
    parentheses: ``input=.../benign (1).png``), saying how to quote it; None when Hydra reads them all."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for arg in argv:
        match = _OVERRIDE.match(arg)
        if arg.startswith("-") or match is None:
            continue
        try:
            parser.parse_overrides([arg])
        except HydraException:
            prefix, key, value = match.groups()
            quoted = (f"\"{prefix}{key}=\\\"{value}\\\"\"" if "'" in value  # inner " escaped for the shell
                      else f"\"{prefix}{key}='{value}'\"")
            return (f"{arg}: Hydra reads ( ) [ ] {{ }} , = and quotes in a value as syntax; quote the value for "
                    f"Hydra inside the shell's quotes: {quoted}")
    return None


def hydra_quoting_hint(prog: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wraps a ``@hydra.main`` entry point: a ``key=value`` Hydra cannot parse ends in one line saying how to
    quote it (exit 2), instead of Hydra's grammar error."""

    def wrap(main: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> Any:
            hint = unreadable_override(sys.argv[1:])
            if hint is not None:
                print(f"{prog}: error: {hint}", file=sys.stderr)
                sys.exit(2)
            return main(*args, **kwargs)

        return run

    return wrap
