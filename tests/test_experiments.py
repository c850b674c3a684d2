"""The experiment files: layered T5X-style (an experiment includes another and overrides macros),
required macros refused until given, includes found from any working directory."""

import dataclasses
import logging

import pytest

from phi_jax import experiment


def test_the_web_experiments_are_phi15_with_another_mixture():
    phi15 = experiment.build_train_config(["phi15"])
    for name in ("phi15_web", "phi15_web_only"):
        config = experiment.build_train_config([name])
        assert config.mixture == name
        assert dataclasses.replace(config, mixture="phi15") == phi15


def test_a_macro_overridden_after_an_include_can_still_be_set_on_the_command_line():
    assert experiment.build_train_config(["phi15_web"], macros={"MIXTURE": "phi1"}).mixture == "phi1"


def test_a_required_macro_is_refused_until_given():
    with pytest.raises(experiment.ExperimentError, match=r"INIT_FROM must be given \(--gin.INIT_FROM=VALUE\)"):
        experiment.build_train_config(["finetune_phi15"])
    assert experiment.build_train_config(["finetune_phi15"], macros={"INIT_FROM": "w/params"}).init_from == "w/params"


def test_includes_resolve_from_any_directory_without_error_logs(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO):
        assert experiment.build_train_config(["phi15_web_only"]).batch_size == 2048
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_run_shorter_than_its_warmup_is_refused_naming_the_macro_to_set():
    with pytest.raises(experiment.ExperimentError,
                       match=r"greater than warmup_steps \(30\); set --gin.WARMUP_STEPS below TRAIN_STEPS \(20\)$"):
        experiment.build_train_config(["tiny_cpu"], macros={"TRAIN_STEPS": "20"})
    config = experiment.build_train_config(["tiny_cpu"], macros={"TRAIN_STEPS": "20", "WARMUP_STEPS": "2"})
    assert config.train_steps == 20


def test_the_phi_1_recipe_warms_up_for_750_steps_then_decays_linearly_to_zero():
    from phi_jax.optimizer import learning_rate_schedule

    schedule = learning_rate_schedule(experiment.build_train_config(["phi1"]).optimizer)
    assert float(schedule(0)) == 0.0
    assert float(schedule(750)) == pytest.approx(1e-3)
    assert float(schedule(18_375)) == pytest.approx(5e-4, rel=1e-3)
    assert float(schedule(36_000)) == pytest.approx(0.0, abs=1e-9)
