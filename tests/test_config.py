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
    # every value the file sets arrives as written (compared with the raw YAML, not with a copy of it)
    raw = yaml.safe_load((ROOT / "experiments" / "digits.yaml").read_text())
    assert exp.sampler.timesteps == raw["sampler"]["timesteps"]
    assert exp.finetune.lr == pytest.approx(float(raw["finetune"]["lr"]))
    assert exp.finetune.train == raw["finetune"]["train"]
    assert dict(exp.search.space) == raw["search"]["space"]
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
        (
            "sampler:\n  name: euler\n",
            "x.yaml: sampler.name: must be one of 'ddim', 'dpmpp_2m', 'dpmpp_3m', 'unipc', got 'euler'",
        ),
        ("data:\n  dataset: cifar10\n", "x.yaml: data.root: is required for dataset 'cifar10'"),
        ("model:\n  source: diffusers\n", "x.yaml: model.path: is required when model.source is 'diffusers'"),
        ("features:\n  train: vgg\n", "x.yaml: features.train: must be one of inception, clip"),
        ("sampler:\n  name: dpmpp_2m\n  eta: 0.5\n", "x.yaml: sampler.eta: must be 0 for sampler dpmpp_2m"),
        (
            "search:\n  objectives: [fid, timesteps]\n",
            "x.yaml: search.scheduler: asha needs a single objective",
        ),
        ("finetune: [1, 2]\n", "x.yaml: finetune: must be a mapping"),
        ("features:\n  eval_resize: 8\n", "x.yaml: features.eval_resize: must be >= 16, got 8"),
        (
            "features:\n  eval: classifier\n  eval_resize: {classifier: 8}\n",
            "x.yaml: features.eval_resize: must be >= 16, got 8 for classifier",
        ),
        (
            "features:\n  eval: classifier\n  eval_resize: {inception: 64}\n",
            "x.yaml: features.eval_resize: names 'inception', which is not an eval space",
        ),
        (
            "finetune:\n  lr_warmup_steps: 5\n",
            "x.yaml: finetune.lr_warmup_steps: is 5 but lr_scheduler 'constant' has no warm-up",
        ),
        (
            "finetune:\n  steps: 10\n  lr_scheduler: cosine\n  lr_warmup_steps: 10\n",
            "x.yaml: finetune.lr_warmup_steps: must be below finetune.steps (10), got 10",
        ),
        ("finetune:\n  noise_batches: 0\n", "x.yaml: finetune.noise_batches: must be >= 1, got 0"),
        (
            "finetune:\n  lr_scheduler: cosine_with_restarts\n",
            "x.yaml: finetune.lr_scheduler: must be one of 'constant', 'constant_with_warmup', 'linear', 'cosine'",
        ),
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


def test_set_override_errors_name_the_override(tmp_path: Path) -> None:
    """A bad value or key given with --set is blamed on the override, not on the file; a bad value in the file
    keeps the file's own message."""
    from mmdsweep.config import load_experiment

    path = tmp_path / "x.yaml"
    path.write_text("finetune:\n  lr: -1.0\n")
    with pytest.raises(ConfigError) as bad_value:
        load_experiment(path, {"eval.real_floor": "maybe"})
    assert str(bad_value.value).startswith(
        f"{path}: finetune.lr: must be > 0"
    )  # the file's error comes first
    path.write_text("finetune:\n  lr: 1.0e-5\n")
    with pytest.raises(ConfigError) as from_set:
        load_experiment(path, {"eval.real_floor": "maybe"})
    assert (
        str(from_set.value)
        == f"{path} (--set eval.real_floor): eval.real_floor: must be true or false, got 'maybe'"
    )
    with pytest.raises(
        ConfigError, match=r"\(--set kernel\.bandwidths\): kernel\.bandwidths\[1\]: must be a finite"
    ):
        load_experiment(path, {"kernel.bandwidths": [1.0, float("nan")]})
    with pytest.raises(
        ConfigError, match=r"\(--set eval\.real_flor\): eval\.real_flor: unknown key; did you mean"
    ):
        load_experiment(path, {"eval.real_flor": False})


def test_configuration_reference_is_current() -> None:
    from mmdsweep.config import reference_markdown

    assert (ROOT / "docs" / "configuration.md").read_text() == reference_markdown()


# ----------------------------------------------------------------------------- pydantic hardening


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("finetune:\n  lr: .inf\n", "x.yaml: finetune.lr: must be a finite number (not nan or inf), got inf"),
        ("kernel:\n  bandwidths: [1.0, .nan]\n", "x.yaml: kernel.bandwidths[1]: must be a finite number"),
        ("finetune:\n  lr: 'nan'\n", "x.yaml: finetune.lr: must be a finite number (not nan or inf)"),
        ("finetune:\n  lr: " + "9" * 400 + "\n", "x.yaml: finetune.lr: must be a finite number, got 999"),
        ("finetune:\n  steps: 5.0\n", "x.yaml: finetune.steps: must be an integer, got 5.0"),
        ("finetune:\n  steps: true\n", "x.yaml: finetune.steps: must be an integer, got True"),
        ("sampler:\n  checkpointing: yes please\n", "x.yaml: sampler.checkpointing: must be true or false"),
        (
            "features:\n  extra_eval: [clip, vgg]\n",
            "x.yaml: features.extra_eval[1]: must be one of inception",
        ),
        ("finetune:\n  lrr: 0.1\n", "x.yaml: finetune.lrr: unknown key; did you mean 'lr'?"),
        ("finetune:\n  1: 2\n", "x.yaml: finetune: key 1 is not a string"),
        ("sampler:\n  eta: 1.5\n", "x.yaml: sampler.eta: must be <= 1, got 1.5"),
        ("sampler:\n  name: unipc\n  eta: 0.5\n", "x.yaml: sampler.eta: must be 0 for sampler unipc"),
        (
            "sampler:\n  timestep_spacing: uniform\n",
            "x.yaml: sampler.timestep_spacing: must be one of 'leading'",
        ),
        ("sampler:\n  clip_sample_range: 0\n", "x.yaml: sampler.clip_sample_range: must be > 0, got 0"),
        (
            "sampler:\n  timesteps: 1001\n",
            "x.yaml: sampler.timesteps: must be <= pretrain.num_train_timesteps",
        ),
        (
            "finetune:\n  train: bias\n",
            "x.yaml: finetune.train: must be one of 'weights', 'timesteps', 'both'",
        ),
        ("finetune:\n  timestep_lr: 0\n", "x.yaml: finetune.timestep_lr: must be > 0, got 0"),
        (
            "finetune:\n  micro_batch_size: 5\n",
            "x.yaml: finetune.micro_batch_size: must divide finetune.batch_size",
        ),
        ("finetune:\n  micro_batch_size: 0\n", "x.yaml: finetune.micro_batch_size: must be >= 1, got 0"),
        (
            "finetune:\n  precision: fp8\n",
            "x.yaml: finetune.precision: must be one of 'fp32', 'bf16', 'fp16'",
        ),
        ("finetune:\n  adapter: dora\n", "x.yaml: finetune.adapter: must be one of 'none', 'lora'"),
        ("finetune:\n  lora: {rank: 0}\n", "x.yaml: finetune.lora.rank: must be >= 1, got 0"),
        ("finetune:\n  lora: {dropout: 1.0}\n", "x.yaml: finetune.lora.dropout: must be < 1, got 1.0"),
        ("finetune:\n  lora: {alpha: -1}\n", "x.yaml: finetune.lora.alpha: must be > 0, got -1"),
        (
            "finetune:\n  lora: {target_modules: []}\n",
            "x.yaml: finetune.lora.target_modules: must have at least 1",
        ),
        ("finetune:\n  lora: {ranks: 4}\n", "x.yaml: finetune.lora.ranks: unknown key; did you mean 'rank'?"),
        ("finetune:\n  compile: 1\n", "x.yaml: finetune.compile: must be true or false, got 1"),
        ("eval:\n  selection_reference: test\n", "x.yaml: eval.selection_reference: must be one of"),
        ("eval:\n  validation_fraction: 0.6\n", "x.yaml: eval.validation_fraction: must be <= 0.5, got 0.6"),
        ("eval:\n  validation_fraction: 0\n", "x.yaml: eval.validation_fraction: must be > 0, got 0"),
        ("eval:\n  final_seeds: []\n", "x.yaml: eval.final_seeds: must have at least 1 item(s)"),
        ("eval:\n  final_seeds: [1, 1, 2]\n", "x.yaml: eval.final_seeds: must be distinct seeds"),
        ("eval:\n  final_seeds: [1, -2]\n", "x.yaml: eval.final_seeds[1]: must be >= 0, got -2"),
        ("eval:\n  final_num_samples: 1\n", "x.yaml: eval.final_num_samples: must be >= 2, got 1"),
        (
            "eval:\n  final_reference: test\n",
            "x.yaml: eval.final_reference: must be one of 'heldout', 'train'",
        ),
        ("eval:\n  heldout_fraction: 0.75\n", "x.yaml: eval.heldout_fraction: must be <= 0.5"),
        ("eval:\n  baselines: maybe\n", "x.yaml: eval.baselines: must be true or false"),
        ("resources:\n  gpu_type: V100\n", "x.yaml: resources.gpu_type: must be one of 'A10G'"),
        ("source: elsewhere\n", "x.yaml: source: unknown key"),
    ],
)
def test_new_rules_give_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_experiment(_write(tmp_path, text))
    msg = str(err.value)
    assert len(msg.splitlines()) == 1
    assert message in msg


def test_new_keys_defaults_and_values(tmp_path: Path) -> None:
    exp = load_experiment(_write(tmp_path, "name: x\n"))
    assert exp.sampler.timestep_spacing is None and exp.sampler.resolved_spacing == "leading"
    assert exp.sampler.final_clamp is True and exp.sampler.clip_sample_range == 1.0
    assert exp.finetune.train == "weights" and exp.finetune.timestep_lr == pytest.approx(1e-2)
    assert exp.finetune.micro_batch_size is None and exp.finetune.precision == "fp32"
    assert exp.finetune.adapter == "none" and exp.finetune.compile is False
    assert exp.finetune.lora.rank == 8 and exp.finetune.lora.alpha == 8.0 and exp.finetune.lora.dropout == 0.0
    assert exp.finetune.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
    assert exp.eval.selection_reference == "validation" and exp.eval.validation_fraction == 0.1
    assert exp.eval.final_seeds == [1001, 1002, 1003] and exp.eval.final_num_samples is None
    assert exp.eval.final_reference == "heldout" and exp.eval.heldout_fraction == 0.1
    assert exp.eval.baselines is True and exp.resources.gpu_type is None
    text = (
        "sampler: {name: dpmpp_3m, timestep_spacing: trailing, clip_sample: null}\n"
        "finetune: {batch_size: 32, micro_batch_size: 8, train: both, precision: bf16, adapter: lora,"
        " lora: {rank: 4, target_modules: [to_q]}}\n"
        "resources: {gpu_type: H200}\n"
    )
    exp = load_experiment(_write(tmp_path, text))
    assert exp.sampler.clip_sample is None and exp.sampler.resolved_spacing == "trailing"
    assert exp.finetune.lora.rank == 4 and exp.finetune.micro_batch_size == 8
    assert exp.with_overrides({"finetune.lora.rank": 2}).finetune.lora.rank == 2
    assert (
        load_experiment(_write(tmp_path, "sampler: {name: unipc}\n")).sampler.resolved_spacing == "linspace"
    )


def test_few_final_seeds_warn_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load_experiment(_write(tmp_path, "eval:\n  final_seeds: [7]\n"))
    err = capsys.readouterr().err
    assert "x.yaml: eval.final_seeds: only 1 seed(s)" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(("old", "new"), [("uniform", "leading"), ("quadratic", "quadratic")])
def test_deprecated_spacing_is_translated_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str
) -> None:
    exp = load_experiment(_write(tmp_path, f"sampler:\n  spacing: {old}\n"))
    assert exp.sampler.timestep_spacing == new
    assert exp.sampler.spacing == old  # the old accessor, for code not yet migrated
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "x.yaml: sampler.spacing is deprecated" in err and f"sampler.timestep_spacing: {new}" in err
    assert "spacing" not in exp.to_dict()["sampler"]
    assert exp.with_overrides({"sampler.spacing": "quadratic"}).sampler.timestep_spacing == "quadratic"
    with pytest.raises(
        ConfigError, match=r"x\.yaml: sampler\.spacing: must be one of 'uniform', 'quadratic'"
    ):
        load_experiment(_write(tmp_path, "sampler:\n  spacing: trailing\n"))
    with pytest.raises(ConfigError, match="x.yaml: sampler.spacing: deprecated alias"):
        load_experiment(_write(tmp_path, "sampler:\n  spacing: uniform\n  timestep_spacing: leading\n"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"name: \xff\xfe\n", "not UTF-8 text (byte 0xff at offset 6); save the file as UTF-8"),
        (b"- a\n- b\n", "top level must be a mapping of sections, got list"),
        (b"just a string\n", "top level must be a mapping of sections, got str"),
        (b"name: !!python/object:os.system {}\n", "not valid YAML: could not determine a constructor"),
        (b"name: !custom x\n", "not valid YAML: could not determine a constructor for the tag '!custom'"),
        (b"a: [1, 2\n", "not valid YAML"),
        (b"[" * 3000, "not valid YAML"),
    ],
)
def test_unreadable_files_give_one_line_errors(tmp_path: Path, content: bytes, message: str) -> None:
    p = tmp_path / "x.yaml"
    p.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_experiment(p)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and msg.startswith(f"{p}: ")
    assert message in msg


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            "finetune.lr: {uniform: [-1, 1]}",
            "search.space.finetune.lr: value -1.0 is invalid: finetune.lr: must be > 0",
        ),
        (
            "sampler.eta: {choice: [0, 2]}",
            "search.space.sampler.eta: value 2 is invalid: sampler.eta: must be <= 1",
        ),
        (
            "sampler.timesteps: {uniform: [5, 10]}",
            "value 5.0 is invalid: sampler.timesteps: must be an integer",
        ),
        (
            "sampler.timesteps: {choice: [5, 2000]}",
            "value 2000 is invalid: sampler.timesteps: must be <= pretrain",
        ),
        (
            "sampler.clip_sample: {choice: [true, 1]}",
            "value 1 is invalid: sampler.clip_sample: must be true or false",
        ),
        ("features.train: {choice: [clip, vgg]}", "value 'vgg' is invalid: features.train: must be one of"),
        ("finetune.nope: {uniform: [1, 2]}", "search.space.finetune.nope: not a config key"),
        ("finetune.lr: {loguniform: [-1, 1]}", "search.space.finetune.lr: loguniform needs 0 < low < high"),
        (
            "kernel.type: {choice: [rbf, imq]}\n    sampler.name: {choice: [ddim, dpmpp_2m]}\n"
            "    sampler.eta: {choice: [0.0, 0.5], when: {sampler.name: dpmpp_2m}}",
            "value 0.5 is invalid: sampler.eta: must be 0 for sampler dpmpp_2m",
        ),
    ],
)
def test_search_values_are_checked_against_their_keys(tmp_path: Path, space: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_experiment(_write(tmp_path, f"search:\n  space:\n    {space}\n"))
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and msg.startswith(f"{tmp_path / 'x.yaml'}: ")
    assert message in msg


def test_bool_search_choice_is_accepted(tmp_path: Path) -> None:
    exp = load_experiment(
        _write(tmp_path, "search:\n  space:\n    sampler.clip_sample: {choice: [true, false]}\n")
    )
    assert exp.with_overrides({"sampler.clip_sample": True}).sampler.clip_sample is True


def test_check_timesteps_against(tmp_path: Path) -> None:
    from mmdsweep.config import check_timesteps_against

    doc = yaml.safe_load((ROOT / "experiments" / "digits.yaml").read_text())
    doc["search"]["space"]["sampler.timesteps"] = {"choice": [5, 10]}
    path = tmp_path / "digits.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    exp = load_experiment(path)
    check_timesteps_against(exp, 1000)
    with pytest.raises(ConfigError) as err:
        check_timesteps_against(exp, 8)  # the search space tries T = 10
    msg = str(err.value)
    assert msg.startswith(f"{path}: search.space.sampler.timesteps: ") or "digits.yaml: " in msg
    assert "must be <= the model's num_train_timesteps (8), got 10" in msg and "\n" not in msg
    with pytest.raises(
        ConfigError, match=r"sampler\.timesteps: must be <= the model's num_train_timesteps \(4\), got 5"
    ):
        check_timesteps_against(exp, 4)


def test_check_feature_names() -> None:
    pytest.importorskip("torchvision")
    from mmdsweep.assets.checks import check_feature_names

    exp = load_experiment(ROOT / "experiments" / "digits.yaml")
    check_feature_names(exp)
    bad = exp.with_overrides({"features.extra_eval": ["clip", "torchvision:mobilenet_v9"]})
    with pytest.raises(ConfigError) as err:
        check_feature_names(bad)
    msg = str(err.value)
    assert "digits.yaml: features.extra_eval[1]: torchvision has no model 'mobilenet_v9'" in msg
    assert "did you mean 'torchvision:mobilenet_v" in msg and "\n" not in msg


def test_config_import_is_light_and_fast() -> None:
    """Validation happens before torch, torchvision, Ray or Optuna are imported."""
    import subprocess
    import sys

    code = (
        "import sys, time; t = time.time(); from mmdsweep.config import load_experiment; "
        f"load_experiment({str(ROOT / 'experiments' / 'digits.yaml')!r}); "
        "heavy = [m for m in ('torch', 'torchvision', 'ray', 'optuna') if m in sys.modules]; "
        "print(heavy, time.time() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    heavy, seconds = out.stdout.rsplit(" ", 1)
    assert heavy == "[]"
    assert float(seconds) < 3.0


def test_dataclass_helpers_keep_working() -> None:
    """Other modules use dataclasses.asdict / replace on config sections."""
    import dataclasses

    exp = load_experiment(ROOT / "experiments" / "digits.yaml")
    assert dataclasses.asdict(exp.pretrain)["num_train_timesteps"] == 1000
    assert dataclasses.replace(exp.finetune, lr=1e-3).lr == 1e-3
    with pytest.raises(ValueError):  # replace re-validates
        dataclasses.replace(exp.finetune, lr=-1.0)


def test_eval_resize_per_space() -> None:
    """One preprocessing per space: a per-space ``eval_resize`` keeps a held-out ImageNet space at its
    size while the classifier (the training space) is evaluated at its own."""
    from mmdsweep.assets.components import space_resize

    base = load_experiment(Path("experiments/digits.yaml"))
    train_mnv2 = base.with_overrides(
        {
            "features.train": "torchvision:mobilenet_v2",
            "features.train_resize": 32,
            "features.eval_resize": None,
        }
    )
    assert space_resize(train_mnv2, "torchvision:mobilenet_v2", for_eval=True) == 32  # the training size
    assert space_resize(train_mnv2, "classifier", for_eval=True) is None  # native
    one = train_mnv2.with_overrides({"features.eval_resize": 64})
    assert [space_resize(one, n, for_eval=True) for n in ("classifier", "torchvision:mobilenet_v2")] == [
        64,
        64,
    ]
    per = base.with_overrides(
        {
            "features.train": "classifier",
            "features.train_resize": None,
            "features.eval_resize": {"torchvision:mobilenet_v2": 32},
        }
    )
    assert space_resize(per, "torchvision:mobilenet_v2", for_eval=True) == 32
    assert space_resize(per, "classifier", for_eval=True) is None
    assert space_resize(per, "classifier", for_eval=False) is None
