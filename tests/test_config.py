"""Experiment config: typed loading, one-line errors, overrides, resolved config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmdsweep.config import ConfigError, load_experiment, parse_override, write_resolved

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "x.yaml"
    p.write_text(text)
    return p


def test_digits_experiment_loads_with_defaults() -> None:
    exp = load_experiment(ROOT / "experiments" / "digits.yaml")
    assert exp.name == "digits"
    assert exp.data.dataset == "digits"
    assert exp.sampler.timesteps == 5
    assert exp.finetune.lr == pytest.approx(2e-5)
    assert exp.search.space["sampler.timesteps"] == {"choice": [5, 10]}
    # a default that the YAML does not set
    assert exp.eval.kid_subsets == 10


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("finetune:\n  lr: -1\n", "x.yaml: finetune.lr: must be > 0, got -1"),
        ("sampler:\n  timesteps: 0\n", "x.yaml: sampler.timesteps: must be >= 1, got 0"),
        ("kernel:\n  bandwidth: 0\n", "x.yaml: kernel.bandwidth: must be > 0, got 0"),
        ("finetune:\n  lrr: 0.1\n", "x.yaml: finetune.lrr: unknown key"),
        ("bogus: 1\n", "x.yaml: bogus: unknown key"),
        ("finetune:\n  steps: ten\n", "x.yaml: finetune.steps: must be an integer, got 'ten'"),
        ("sampler:\n  name: euler\n", "x.yaml: sampler.name: must be one of 'ddim', 'dpmpp_2m', 'dpmpp_3m', 'unipc', got 'euler'"),
        ("data:\n  dataset: cifar10\n", "x.yaml: data.root: is required for dataset 'cifar10'"),
        ("model:\n  source: diffusers\n", "x.yaml: model.path: is required when model.source is 'diffusers'"),
        ("features:\n  train: vgg\n", "x.yaml: features.train: must be one of inception, clip"),
        ("sampler:\n  name: dpmpp_2m\n  eta: 0.5\n", "x.yaml: sampler.eta: must be 0 for sampler dpmpp_2m"),
        (
            "search:\n  objectives: [fid, timesteps]\n",
            "x.yaml: search.scheduler: asha needs a single objective",
        ),
        ("finetune: [1, 2]\n", "x.yaml: finetune: must be a mapping"),
    ],
)
def test_bad_values_give_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_experiment(_write(tmp_path, text))
    msg = str(err.value)
    assert "\n" not in msg
    assert message in msg


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="experiment file not found"):
        load_experiment(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(_write(tmp_path, "a: [1, 2\n"))


def test_yaml_floats_written_as_strings_are_accepted(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads "1e-5" as a string; we accept it where a float is expected
    exp = load_experiment(_write(tmp_path, "finetune:\n  lr: 1e-5\n"))
    assert exp.finetune.lr == pytest.approx(1e-5)


def test_safe_load_refuses_python_tags(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(_write(tmp_path, "name: !!python/object/apply:os.system ['true']\n"))


def test_overrides_are_validated(tmp_path: Path) -> None:
    p = _write(tmp_path, "finetune:\n  lr: 0.001\n")
    exp = load_experiment(p, {"finetune.lr": 0.01, "sampler.timesteps": 10})
    assert exp.finetune.lr == 0.01 and exp.sampler.timesteps == 10
    exp2 = exp.with_overrides({"kernel.type": "rbf", "kernel.bandwidth": 2.0})
    assert exp2.kernel.type == "rbf" and exp.kernel.type == "polynomial"
    with pytest.raises(ConfigError, match="kernel.bandwidth: must be > 0"):
        exp.with_overrides({"kernel.bandwidth": -3.0})
    with pytest.raises(ConfigError, match="kernel.nope: unknown config key"):
        exp.with_overrides({"kernel.nope": 1})


def test_parse_override() -> None:
    assert parse_override("finetune.lr=1e-4") == ("finetune.lr", 1e-4)
    assert parse_override("sampler.timesteps=10") == ("sampler.timesteps", 10)
    assert parse_override("features.train=classifier") == ("features.train", "classifier")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("finetune.lr")


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    exp = load_experiment(ROOT / "experiments" / "digits.yaml")
    out = write_resolved(exp, tmp_path / "run")
    again = load_experiment(out)
    assert again.to_dict() == exp.to_dict()
    assert yaml.safe_load(out.read_text())["eval"]["num_samples"] == exp.eval.num_samples


def test_configuration_reference_is_current() -> None:
    from mmdsweep.config import reference_markdown

    assert (ROOT / "docs" / "configuration.md").read_text() == reference_markdown()
