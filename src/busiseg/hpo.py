"""Hyperparameter search with Optuna: ``python -m busiseg.hpo [hparams_search=optuna] [overrides]``.

A thin sweeper on Optuna's own API rather than Hydra's Optuna sweeper plugin: the plugin
(hydra-optuna-sweeper 1.2/1.3) requires ``optuna<3``, and Optuna 2.10's SQLite storage fails
with the SQLAlchemy 2 that pip installs next to it (``AssertionError`` in
``get_current_version``), so a study could not be stored, let alone resumed. See
docs/scaling.md.

The search space (``hpo.params``) uses the plugin's syntax (``interval(a, b)``,
``tag(log, interval(a, b))``, ``range(a, b, step)``, ``choice(x, y)``), so it reads as a
Hydra sweep. A parameter that is also given on the command line is fixed, not searched
(as with the plugin). Each trial is one ``busiseg.train.train`` run in
``<hpo.dir>/trial_NNN`` with the trial's values as overrides; its objective is the train
task's return value, ``metrics[optimized_metric]``. The study lives in
``<hpo.dir>/study.db`` (SQLite): run the same command with ``hpo.dir=<that dir>`` to resume a
killed sweep (a trial cut off by the kill is tried again with the same values). The best
trial is written to ``<hpo.dir>/best_params.yaml``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: E402
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from busiseg import distributed  # noqa: E402
from busiseg.cli import unreadable_override  # noqa: E402

log = logging.getLogger("busiseg.hpo")

SEARCH_GROUP = "hparams_search=optuna"


def compose_train(overrides: Sequence[str], output_dir: str | None = None) -> DictConfig:
    """The train config for ``overrides`` (with Hydra's node set, as under ``@hydra.main``)."""
    from busiseg.train import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = os.getcwd()
        cfg.hydra.runtime.output_dir = output_dir or os.getcwd()
        cfg.hydra.job.name = "train"
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


def parse_space(params: dict[str, str]) -> dict[str, Any]:
    """``{key: "interval(1e-4, 1e-2)", ...}`` -> ``{key: parsed Hydra sweep}`` (ChoiceSweep, RangeSweep, IntervalSweep)."""
    parser = OverridesParser.create()
    space = {}
    for key, text in params.items():
        override = parser.parse_override(f"{key}={text}")
        value = override.value()
        if not isinstance(value, (ChoiceSweep, RangeSweep, IntervalSweep)):
            raise ValueError(f"hpo.params.{key}: {text!r} is not a sweep; use interval(a, b), "
                             f"tag(log, interval(a, b)), range(a, b, step) or choice(x, y, ...)")
        space[key] = value
    return space


def suggest(trial: Any, key: str, sweep: Any) -> Any:
    """One value of ``sweep`` for ``trial``, as the Hydra Optuna sweeper maps it."""
    log_scale = "log" in sweep.tags
    if isinstance(sweep, ChoiceSweep):
        return trial.suggest_categorical(key, list(sweep.list))
    if isinstance(sweep, RangeSweep):
        return trial.suggest_int(key, int(sweep.start), int(sweep.stop) - 1, step=int(sweep.step or 1), log=log_scale)
    if isinstance(sweep.start, int) and isinstance(sweep.end, int) and "float" not in sweep.tags:
        return trial.suggest_int(key, sweep.start, sweep.end, log=log_scale)
    return trial.suggest_float(key, float(sweep.start), float(sweep.end), log=log_scale)


def _override(key: str, value: Any) -> str:
    return f"{key}={value}" if not isinstance(value, str) else f"{key}='{value}'"


def _fixed_keys(overrides: Sequence[str]) -> set[str]:
    keys = set()
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        keys.add(o.key_or_group)
    return keys


def _sampler(spec: Any, worker: int, trials_before: int):
    """The configured sampler, its ``seed`` (when set) moved on by the trials the study already holds and by the
    worker number: a resumed study, or a second worker, draws new values instead of repeating the first
    process's (a seeded sampler starts its random stream over in every process)."""
    from hydra.utils import instantiate

    spec = OmegaConf.to_container(spec, resolve=True) if not isinstance(spec, dict) else dict(spec)
    if spec.get("seed") is not None:
        spec["seed"] = int(spec["seed"]) + 100_003 * worker + trials_before
    return instantiate(spec)


def run_study(overrides: Sequence[str]):
    """Create or resume the study, run the trials still missing, write best_params.yaml; return the study."""
    import optuna
    from optuna.trial import TrialState

    from busiseg.train import train  # here: importing it sets up a DDP child (busiseg.distributed)

    overrides = list(overrides)
    if not any(o.startswith("hparams_search=") for o in overrides):
        overrides.insert(0, SEARCH_GROUP)
    base = compose_train(overrides)
    if base.get("hpo") is None:
        raise ValueError("no hpo: node in the config; use hparams_search=optuna")
    hpo = base.hpo
    worker = hpo.get("worker") or 0
    if not isinstance(worker, int) or isinstance(worker, bool) or worker < 0:
        raise ValueError(f"hpo.worker={worker!r}: a whole number >= 0, a different one for each worker sharing "
                         "the study")
    sweep_dir = Path(str(hpo.dir)).expanduser().resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    overrides.append(f"hpo.dir='{sweep_dir}'")  # one dir for every trial (it holds ${now:...})
    storage = str(hpo.storage) if hpo.get("storage") else f"sqlite:///{sweep_dir / 'study.db'}"
    handler = logging.FileHandler(sweep_dir / "hpo.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        fixed = _fixed_keys(overrides)
        params = {k: v for k, v in OmegaConf.to_container(hpo.params, resolve=True).items() if k not in fixed}
        space = parse_space(params)
        study = optuna.create_study(study_name=str(hpo.study_name), storage=storage,
                                    direction=str(hpo.direction), load_if_exists=True)
        # a trial of this worker still RUNNING in the stored study was cut off by a kill (one process per worker
        # number at a time): fail it, try its values again. Other workers' running trials are left alone.
        for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if int(stale.user_attrs.get("worker", 0)) != worker:
                continue
            study.tell(stale.number, state=TrialState.FAIL)
            study.enqueue_trial(stale.params, skip_if_exists=False)
            log.warning("trial %d was interrupted: its values are tried again", stale.number)
        if hpo.get("sampler"):
            study.sampler = _sampler(hpo.sampler, worker, len(study.trials))
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        remaining = max(0, int(hpo.n_trials) - done)
        log.info("study %s in %s: %d trial(s) done, %d to run; space: %s", study.study_name, storage, done,
                 remaining, params)
        metric = str(base.optimized_metric)

        def objective(trial) -> float:
            trial.set_user_attr("worker", worker)  # first: a trial killed from here on is this worker's to retry
            values = {key: suggest(trial, key, sweep) for key, sweep in space.items()}
            run_dir = sweep_dir / f"trial_{trial.number:03d}"
            cfg = compose_train(overrides + [_override(k, v) for k, v in values.items()], output_dir=str(run_dir))
            with open_dict(cfg):
                cfg.paths.output_dir = str(run_dir)
            trial.set_user_attr("run_dir", str(run_dir))
            log.info("trial %d: %s", trial.number, values)
            summary = train(cfg)
            value = summary["metrics"].get(metric)  # what train's main returns to a sweeper
            if value is None or not math.isfinite(value):
                raise RuntimeError(f"trial {trial.number}: {metric} is {value} (not in metrics.json?); "
                                   f"set optimized_metric to one of {sorted(summary['metrics'])}")
            return float(value)

        if remaining:
            study.optimize(objective, n_trials=remaining, catch=(Exception,), gc_after_trial=True)
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not completed:
            raise RuntimeError(f"no trial of study {study.study_name} completed; see {sweep_dir / 'hpo.log'}")
        best = study.best_trial
        result = {
            "name": "optuna",
            "study_name": study.study_name,
            "storage": storage,
            "direction": str(hpo.direction),
            "optimized_metric": metric,
            "best_params": best.params,
            "best_value": best.value,
            "best_trial": best.number,
            "best_run_dir": best.user_attrs.get("run_dir"),
            "n_trials_complete": len(completed),
            "n_trials_failed": len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))),
        }
        OmegaConf.save(OmegaConf.create(result), sweep_dir / "best_params.yaml")
        log.info("best trial %d: %s = %.4f with %s (%s)", best.number, metric, best.value, best.params,
                 sweep_dir / "best_params.yaml")
        return study
    finally:  # also when the study fails: later logging must not write into its folder
        logging.getLogger().removeHandler(handler)
        handler.close()


def main(argv: Sequence[str] | None = None) -> int:
    if distributed.is_ddp_child():  # a DDP rank of a trial: it runs that trial's train job
        from busiseg.train import main as train_main

        train_main()
        return 0
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    hint = unreadable_override(args)
    if hint is not None:
        print(f"busiseg.hpo: error: {hint}", file=sys.stderr)
        return 2
    try:
        run_study(args)
    except (ValueError, RuntimeError) as exc:
        print(f"busiseg.hpo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
