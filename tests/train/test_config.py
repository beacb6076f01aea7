"""Experiment configs: loading get_config(), typed --set overrides, and errors that name the bad key."""
import json

import pytest

from sdjax.errors import ConfigError
from sdjax.train import cli
from sdjax.train.config import (
    TrainConfig,
    apply_overrides,
    flatten,
    from_dict,
    load_config,
    to_dict,
)
from tests.train.conftest import EXPERIMENT


def test_experiment_file_loads_and_overrides_are_typed():
    config = load_config(EXPERIMENT, ["optimizer.learning_rate=3e-4", "num_steps=7", "data.random_flip=false",
                                      "sample_prompts=a red cat|a blue dog", "optimizer.schedule=cosine"])
    assert config.optimizer.learning_rate == 3e-4 and config.num_steps == 7
    assert config.data.random_flip is False and config.optimizer.schedule == "cosine"
    assert config.sample_prompts == ("a red cat", "a blue dog")
    assert config.data.resolution == 16  # untouched values come from get_config()


def test_unknown_key_names_it_and_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"'optimizer\.learnig_rate'.*'optimizer\.learning_rate'"):
        apply_overrides(TrainConfig(), ["optimizer.learnig_rate=1e-3"])
    with pytest.raises(ConfigError, match=r"'batchsize'.*'batch_size'"):
        from_dict({"batchsize": 2})


def test_invalid_values_name_the_key():
    with pytest.raises(ConfigError, match=r"optimizer\.schedule = 'cosin'.*'cosine'"):
        apply_overrides(TrainConfig(), ["optimizer.schedule=cosin"])
    with pytest.raises(ConfigError, match="num_steps"):
        apply_overrides(TrainConfig(), ["num_steps=ten"])
    with pytest.raises(ConfigError, match="grad_accumulation"):
        apply_overrides(TrainConfig(), ["batch_size=3", "optimizer.grad_accumulation=2"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(TrainConfig(), ["num_steps"])


def test_broken_config_files_name_the_file_and_line(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"seed": 1,\n "batch_size": }')
    with pytest.raises(ConfigError, match=r"broken\.json: not valid JSON.*line 2"):
        load_config(broken)
    (tmp_path / "typo.json").write_text('{"batchsize": 2}')
    with pytest.raises(ConfigError, match=r"typo\.json: unknown config key 'batchsize'"):
        load_config(tmp_path / "typo.json")
    cases = {
        "raises.py": ("def get_config():\n    return {}['lr']\n", r"raises\.py, line 2: get_config\(\) failed: KeyError"),
        "syntax.py": ("def get_config(:\n", r"syntax\.py, line 1: get_config\(\) failed: SyntaxError"),
        "imports.py": ("import not_a_module\n", r"imports\.py, line 1: .*ModuleNotFoundError.*not_a_module"),
        "choice.py": ("from sdjax.train.config import TrainConfig\n\ndef get_config():\n"
                      "    return TrainConfig(stage='vea')\n", r"choice\.py, line 4: stage = 'vea'.*'vae'"),
        "missing.py": ("x = 1\n", r"missing\.py has no get_config\(\)"),
    }
    for name, (source, message) in cases.items():
        (tmp_path / name).write_text(source)
        with pytest.raises(ConfigError, match=message):
            load_config(tmp_path / name)


def test_a_broken_architecture_file_is_named(tmp_path):
    from sdjax.train.task import component_config

    (tmp_path / "unet.json").write_text('{"block_out_channels": [32, 64,]}')
    with pytest.raises(ConfigError, match=r"unet\.json: not valid JSON"):
        component_config("unet", str(tmp_path / "unet.json"), None)


def test_resolved_config_round_trips_through_json():
    config = load_config(EXPERIMENT, ["seed=5", "sample_prompts=x|y"])
    assert from_dict(json.loads(json.dumps(to_dict(config)))) == config


def test_cli_reports_a_bad_key_and_documents_every_key(capsys):
    assert cli.main([str(EXPERIMENT), "--workdir", "unused", "--set", "data.resolutoin=8"]) == 2
    assert "data.resolution" in capsys.readouterr().err
    help_text = cli.build_parser().format_help()
    assert all(key in help_text for key in flatten(TrainConfig()))


def test_cli_prints_the_resolved_config(capsys):
    assert cli.main([str(EXPERIMENT), "--workdir", "unused", "--set", "seed=3", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 3
