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


def override_values(argv: Sequence[str], keys: Sequence[str]) -> dict[str, Any]:
    """The values the command line gives ``keys`` (``key=value`` arguments as Hydra parses them), for checks
    that must run before Hydra creates the run dir; keys not given are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in argv if not a.startswith("-") and (m := _OVERRIDE.match(a)) and m.group(2) in keys]
    return {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(args)}


def null_group_override(argv: Sequence[str], config_path: str) -> str | None:
    """``GROUP=null`` for a config group (``logger=null``), which Hydra refuses with a traceback: how to drop the
    group instead (``~GROUP``); None when the command line has none."""
    from pathlib import Path

    for arg in argv:
        match = _OVERRIDE.match(arg)
        if match is None or match.group(1) or match.group(3) != "null":
            continue
        key = match.group(2)
        group = Path(config_path) / key
        if "." not in key and group.is_dir():
            if (group / "none.yaml").is_file():
                return f"{arg}: {key} is a config group; to turn it off write {key}=none"
            return f"{arg}: {key} is a config group; to leave it out write ~{key} (quoted in zsh: '~{key}')"
    return None


def run_dir_problem(argv: Sequence[str]) -> str | None:
    """Why the run dir the command line names (``hydra.run.dir``, or ``hydra.sweep.dir`` with ``-m``) cannot be
    made or written into, before Hydra tries and fails with a traceback; None when it can, or when the command
    line names none (or one with an interpolation, which only Hydra can resolve)."""
    from busiseg.atomic import output_folder_problem

    key = "hydra.sweep.dir" if ("-m" in argv or "--multirun" in argv) else "hydra.run.dir"
    value = override_values(argv, [key]).get(key)
    if not isinstance(value, str) or not value or "${" in value:
        return None
    problem = output_folder_problem(value)
    return None if problem is None else f"{key}={value}: {problem}"


# numeric defaults that take a word too (``trainer.precision=bf16-mixed``, ``trainer.devices=auto``,
# ``data.num_workers=auto``): their own checks judge the value
NUMBER_OR_WORD = ("trainer.precision", "trainer.devices", "data.num_workers")


def _kind(value: Any) -> str | None:
    """What a config default asks a command-line value to be: ``bool``, ``number`` or None (anything goes)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return None


def mistyped_override(cfg: Any, config_name: str) -> str | None:
    """The first ``key=value`` of the command line whose value is not of the kind of the key's default (``true`` or
    ``false`` for a boolean, a number for a number: ``overlays=no`` would otherwise read as true, and
    ``batch_size=abc`` fail later in a traceback), as one line naming it; None when all fit. The defaults are the
    config composed with the command line's group choices only; keys without a default, or a null one, and
    ``null`` values are not checked (a key's own check judges the value)."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    hydra_cfg = HydraConfig.get()
    choices = set(hydra_cfg.runtime.choices)
    overrides = OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task))
    given = [o for o in overrides if o.key_or_group not in choices and o.key_or_group not in NUMBER_OR_WORD
             and not (o.is_delete() or o.is_add() or o.is_force_add()) and o.package is None]
    if not given:
        return None
    try:
        base = compose(config_name=config_name, overrides=[o.input_line for o in overrides if o not in given])
    except Exception:  # noqa: BLE001 - a check must never stop a command Hydra itself accepted
        return None
    for override in given:
        key = override.key_or_group
        want = _kind(OmegaConf.select(base, key, default=None, throw_on_missing=False))
        try:
            value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        except Exception:  # an interpolation that does not resolve: Hydra's and the task's to report
            continue
        if want is None or value is None or _kind(value) == want:
            continue
        default = OmegaConf.select(base, key)
        wanted, shown = ("true or false", str(default).lower()) if want == "bool" else ("a number", default)
        return f"{override.input_line}: {key} takes {wanted} (default: {shown})"
    return None


def entry_point(prog: str, config_path: str, config_name: str,
                precheck: Callable[[Sequence[str]], str | None] | None = None
                ) -> Callable[[Callable[[Any], Any]], Callable[[], Any]]:
    """``@hydra.main(config_path, config_name)`` for a task, so that a command line it cannot use ends with exit
    status 2 (the run could not start) and one line naming the fault: a ``key=value`` Hydra cannot parse gets
    the quoting that works (:func:`unreadable_override`), a run dir that cannot be made is named
    (:func:`run_dir_problem`), ``precheck(argv)``'s message (checks needed before
    Hydra creates the run dir) ends it, and Hydra's own refusals before the task starts (an unknown key, a
    missing config group option), which Hydra ends with status 1, are given status 2 and a closing line."""
    import hydra

    def wrap(task: Callable[[Any], Any]) -> Callable[[], Any]:
        started: list[bool] = []

        @functools.wraps(task)
        def marked(cfg: Any) -> Any:
            started.append(True)
            problem = mistyped_override(cfg, config_name)
            if problem is not None:
                logging.getLogger(prog).error("%s", problem)
                print(f"{prog}: error: {problem}", file=sys.stderr)
                sys.exit(2)
            return task(cfg)

        hydra_main = hydra.main(version_base="1.3", config_path=config_path, config_name=config_name)(marked)

        @functools.wraps(task)
        def run() -> Any:
            argv = sys.argv[1:]
            problem = (unreadable_override(argv) or null_group_override(argv, config_path) or run_dir_problem(argv)
                       or (precheck(argv) if precheck is not None else None))
            if problem is not None:
                print(f"{prog}: error: {problem}", file=sys.stderr)
                sys.exit(2)
            try:
                return hydra_main()
            except SystemExit as exc:
                if exc.code == 1 and not started:  # Hydra refused the command line: no task ran
                    print(f"{prog}: error: the command line could not be used (Hydra's message above); "
                          "nothing ran", file=sys.stderr)
                    sys.exit(2)
                raise

        return run

    return wrap
