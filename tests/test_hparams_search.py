"""hparams_search=optuna: a 2-trial study on the phantom, stored in SQLite, resumable."""

from __future__ import annotations

import optuna
import pytest
from omegaconf import OmegaConf

from busiseg.hpo import compose_train, parse_space, run_study, suggest
from tests.test_train import FAST

TINY = ["debug=limit", "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "logger=csv", "callbacks.image_logger=null"]


def overrides(tmp_path, data_dir) -> list[str]:
    return [*FAST, *TINY, f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}", f"hpo.dir={tmp_path / 'hpo'}"]


def test_search_space_composes_and_maps_to_optuna(tmp_path):
    cfg = compose_train(["hparams_search=optuna", f"paths.root_dir={tmp_path}"])
    space = parse_space(OmegaConf.to_container(cfg.hpo.params))
    assert set(space) >= {"optimizer.lr", "loss.weighting.w_cls", "model.encoder_name", "augment.lighter.1"}
    trial = optuna.create_study().ask()
    values = {k: suggest(trial, k, s) for k, s in space.items()}
    assert 1e-4 <= values["optimizer.lr"] <= 3e-3
    assert values["model.encoder_name"] in ("resnet18", "resnet34", "efficientnet-b0")
    assert trial.distributions["optimizer.lr"].log
    # every sampled value is a valid train override
    compose_train(["hparams_search=optuna", f"paths.root_dir={tmp_path}",
                   *[f"{k}={v}" for k, v in values.items()]])


def test_two_trial_study_writes_best_params_and_resumes(tmp_path, data_dir):
    args = overrides(tmp_path, data_dir) + ["hpo.n_trials=2"]
    study = run_study(args)
    sweep = tmp_path / "hpo"
    assert (sweep / "study.db").is_file()
    best = OmegaConf.load(sweep / "best_params.yaml")
    assert best.n_trials_complete == 2
    assert "optimizer.lr" in best.best_params and "model.encoder_name" not in best.best_params  # fixed by FAST
    assert 0.0 <= best.best_value <= 1.0
    assert best.best_value == max(t.value for t in study.trials)
    for n in (0, 1):
        assert (sweep / f"trial_{n:03d}" / "metrics.json").is_file()
    # the same command finds the stored study: nothing left to run at n_trials=2, one more at 3
    again = run_study(overrides(tmp_path, data_dir) + ["hpo.n_trials=3"])
    assert len(again.trials) == 3
    assert OmegaConf.load(sweep / "best_params.yaml").n_trials_complete == 3
    # the resumed process's seeded sampler does not start its stream over: new values, not trial 0's again
    assert again.trials[2].params != again.trials[0].params


def test_workers_resume_only_their_own_cut_off_trials(tmp_path, data_dir):
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState

    (tmp_path / "hpo").mkdir()
    study = optuna.create_study(study_name="busiseg", storage=f"sqlite:///{tmp_path / 'hpo' / 'study.db'}",
                                direction="maximize")
    other = study.ask({"optimizer.lr": FloatDistribution(1e-4, 3e-3, log=True)})  # worker 1's, still running
    other.set_user_attr("worker", 1)
    resumed = run_study(overrides(tmp_path, data_dir) + ["hpo.n_trials=1"])  # worker 0
    assert [t.state for t in resumed.trials] == [TrialState.RUNNING, TrialState.COMPLETE]
    assert resumed.trials[1].user_attrs["worker"] == 0
    for bad in ("-1", "a"):
        with pytest.raises(ValueError, match="hpo.worker"):
            run_study(overrides(tmp_path, data_dir) + [f"hpo.worker={bad}"])


def test_a_failed_study_leaves_no_log_handler_behind(tmp_path, data_dir):
    """hpo.log is written through a handler on the root logger: it goes when the study fails too (a later test
    or caller would otherwise log into a deleted folder)."""
    import logging

    with pytest.raises(RuntimeError, match="no trial"):
        run_study(overrides(tmp_path, data_dir) + ["hpo.n_trials=1", "optimized_metric=val/no_such_metric"])
    assert (tmp_path / "hpo" / "hpo.log").is_file()
    assert not [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)
                and str(tmp_path) in getattr(h, "baseFilename", "")]


def test_a_trial_cut_off_by_a_kill_is_tried_again(tmp_path, data_dir):
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState

    (tmp_path / "hpo").mkdir()
    study = optuna.create_study(study_name="busiseg", storage=f"sqlite:///{tmp_path / 'hpo' / 'study.db'}",
                                direction="maximize")
    study.ask({"optimizer.lr": FloatDistribution(1e-4, 3e-3, log=True)})  # left RUNNING, as a killed sweep leaves it
    resumed = run_study(overrides(tmp_path, data_dir) + ["hpo.n_trials=1"])
    assert [t.state for t in resumed.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert resumed.trials[1].params["optimizer.lr"] == resumed.trials[0].params["optimizer.lr"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hpo_data")
