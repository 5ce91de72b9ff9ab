"""Tests for mmdsweep.sweep.search: YAML search-space validation and Optuna plumbing."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from mmdsweep.sweep.search import (
    SearchParam,
    close_orphan_trials,
    define_by_run,
    make_sampler,
    make_searcher,
    param_types,
    validate_space,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE_YAML = """
finetune.lr:        {loguniform: [1.0e-6, 1.0e-4]}
kernel.type:        {choice: [polynomial, rbf, imq]}
kernel.bandwidth:
  - {loguniform: [0.1, 10.0], when: {kernel.type: rbf}}
  - {uniform: [0.5, 2.0], when: {kernel.type: [imq]}}
kernel.degree:      {int: [2, 4], when: {kernel.type: polynomial}}
kernel.coef0:       {uniform: [0.0, 1.0], step: 0.25, when: {kernel.degree: [3, 4]}}
sampler.timesteps:  {choice: [5, 10]}
features.train:     {choice: [classifier, "torchvision:mobilenet_v2"]}
finetune.ema_decay: {uniform: [0.9, 0.999]}
finetune.batch_size: {int: [16, 64], log: true}
finetune.accum:     {int: [1, 7], step: 2}
finetune.use_ema:   {choice: [true, false]}
"""


@pytest.fixture(scope="module")
def params() -> list[SearchParam]:
    return validate_space(yaml.safe_load(SPACE_YAML))


def test_validate_full_space(params: list[SearchParam]) -> None:
    names = [p.optuna_name for p in params]
    assert names == [
        "finetune.lr",
        "kernel.type",
        "kernel.bandwidth[kernel.type=rbf]",
        "kernel.bandwidth[kernel.type=imq]",
        "kernel.degree[kernel.type=polynomial]",
        "kernel.coef0[kernel.degree=3|4]",
        "sampler.timesteps",
        "features.train",
        "finetune.ema_decay",
        "finetune.batch_size",
        "finetune.accum",
        "finetune.use_ema",
    ]
    by_name = {p.optuna_name: p for p in params}
    assert by_name["finetune.lr"].log and by_name["finetune.lr"].kind == "loguniform"
    assert by_name["finetune.batch_size"].log and by_name["finetune.batch_size"].low == 16
    assert by_name["kernel.bandwidth[kernel.type=imq]"].key == "kernel.bandwidth"
    assert by_name["finetune.accum"].step == 2


def test_param_types(params: list[SearchParam]) -> None:
    assert param_types(params) == {
        "finetune.lr": "float",
        "kernel.type": "str",
        "kernel.bandwidth": "float",
        "kernel.degree": "int",
        "kernel.coef0": "float",
        "sampler.timesteps": "int",
        "features.train": "str",
        "finetune.ema_decay": "float",
        "finetune.batch_size": "int",
        "finetune.accum": "int",
        "finetune.use_ema": "str",  # results columns are float/int/str; bools are stored as "True"/"False"
    }
    mixed = validate_space(
        {
            "a": {"choice": [1, 2.5]},
            "b": {"choice": ["x", 3]},
            "c": {"choice": ["p", "q"]},
            "d": [{"int": [1, 3], "when": {"c": "p"}}, {"uniform": [0, 1], "when": {"c": "q"}}],
        }
    )
    assert param_types(mixed) == {"a": "float", "b": "str", "c": "str", "d": "float"}


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            {"finetune.lr": {"loguniform": [0, 1]}},
            "search.space.finetune.lr: loguniform needs 0 < low < high, got [0, 1]",
        ),
        ({"x": {"loguniform": [1e-3, 1e-4]}}, "search.space.x: loguniform needs 0 < low < high"),
        ({"x": {"uniform": [1, 1]}}, "search.space.x: uniform needs low < high, got [1, 1]"),
        ({"x": {"uniform": [0, "a"]}}, "uniform needs a list [low, high] of two finite numbers"),
        ({"x": {"uniform": [0, 1, 2]}}, "uniform needs a list [low, high]"),
        ({"x": {"int": [1.5, 3]}}, "search.space.x: int needs integer bounds, got [1.5, 3]"),
        ({"x": {"int": [0, 8], "log": True}}, "int with log: true needs low >= 1"),
        ({"x": {"int": [1, 8], "step": 2}}, "int step 2 does not divide high - low = 7"),
        ({"x": {"int": [1, 9], "step": 2, "log": True}}, "cannot combine log: true with step"),
        ({"x": {"choice": []}}, "search.space.x: choice needs a non-empty list of options, got []"),
        ({"x": {"choice": [1, 1]}}, "choice options must be distinct"),
        ({"x": {"choice": [[1], 2]}}, "choice options must be str, int, float or bool"),
        ({"x": {"normal": [0, 1]}}, "search.space.x: unknown distribution 'normal'"),
        ({"x": {"uniform": [0, 1], "choice": [1]}}, "needs exactly one distribution"),
        ({"x": {"loguniform": [1, 2], "log": True}}, "unknown option(s) ['log'] for loguniform"),
        ({"x": 0.5}, "a distribution spec must be a mapping"),
        ({"x": {"uniform": [0, 1], "when": {"y": "a"}}}, "when refers to unknown parameter 'y'"),
        (
            {"x": {"uniform": [0, 1], "when": {"x": 0.5}}},
            "search.space: when conditions form a cycle: x -> x",
        ),
        (
            {"a": {"choice": [1, 2], "when": {"b": "p"}}, "b": {"choice": ["p", "q"], "when": {"a": 1}}},
            "search.space: when conditions form a cycle: a -> b -> a",
        ),
        (
            {"y": {"choice": ["a"]}, "x": {"uniform": [0, 1], "when": {"y": "b"}}},
            "when y = [b]: not among its choices [a]",
        ),
        ({"y": {"int": [1, 3]}, "x": {"uniform": [0, 1], "when": {"y": 7}}}, "outside its int range"),
        (
            {"y": {"uniform": [0, 1]}, "x": {"uniform": [0, 1], "when": {"y": 0.5}}},
            "only refer to choice or int",
        ),
        ({"y": {"choice": ["a"]}, "x": {"uniform": [0, 1], "when": {}}}, "when needs a non-empty mapping"),
        (
            {
                "y": {"choice": ["a", "b"]},
                "x": [{"uniform": [0, 1]}, {"uniform": [0, 2], "when": {"y": "a"}}],
            },
            "every spec needs a when",
        ),
        (
            {
                "y": {"choice": ["a", "b"]},
                "x": [
                    {"uniform": [0, 1], "when": {"y": "a"}},
                    {"uniform": [0, 2], "when": {"y": ["a", "b"]}},
                ],
            },
            "branches x[y=a] and x[y=a|b] may both apply",
        ),
        ({}, "search.space: must be a non-empty mapping"),
        ({"bad key": {"uniform": [0, 1]}}, "invalid parameter key"),
    ],
)
def test_validation_errors(space: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_space(space)
    assert message in str(info.value)


def test_where_prefix_is_used() -> None:
    with pytest.raises(ValueError, match=r"^exp\.search\.space\.a: choice needs"):
        validate_space({"a": {"choice": []}}, where="exp.search.space")


def test_define_by_run_samples_branches_with_distinct_optuna_names(params: list[SearchParam]) -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = define_by_run(params)
    configs: list[dict[str, Any]] = []

    def objective(trial: optuna.Trial) -> float:
        configs.append(space(trial))
        return 0.0

    study.optimize(objective, n_trials=60)
    types_seen = set()
    for cfg, trial in zip(configs, study.trials):
        ktype = cfg["kernel.type"]
        types_seen.add(ktype)
        assert ("kernel.bandwidth" in cfg) == (ktype in ("rbf", "imq"))
        assert ("kernel.degree" in cfg) == (ktype == "polynomial")
        assert ("kernel.coef0" in cfg) == (cfg.get("kernel.degree") in (3, 4))
        if ktype == "rbf":
            assert 0.1 <= cfg["kernel.bandwidth"] <= 10.0
            assert trial.params["kernel.bandwidth[kernel.type=rbf]"] == cfg["kernel.bandwidth"]
        if ktype == "imq":
            assert 0.5 <= cfg["kernel.bandwidth"] <= 2.0
            assert "kernel.bandwidth[kernel.type=rbf]" not in trial.params
        if "kernel.coef0" in cfg:
            assert cfg["kernel.coef0"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert cfg["finetune.accum"] in (1, 3, 5, 7)
        assert 16 <= cfg["finetune.batch_size"] <= 64 and isinstance(cfg["finetune.batch_size"], int)
        assert isinstance(cfg["finetune.use_ema"], bool)
        assert all("[" not in k for k in cfg)
    assert types_seen == {"polynomial", "rbf", "imq"}


def test_searcher_single_objective_reports_dotted_keys(params: list[SearchParam]) -> None:
    searcher = make_searcher(params, ["fid"], ["min"], seed=3)
    assert searcher.metric == "fid" and searcher.mode == "min"
    cfg = searcher.suggest("t0")
    assert cfg is not None and "finetune.lr" in cfg and all("[" not in k for k in cfg)
    searcher.on_trial_result("t0", {"fid": 5.0, "training_iteration": 1})
    searcher.on_trial_complete("t0", {"fid": 4.0})
    assert searcher._ot_study is not None
    trial = searcher._ot_study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 4.0
    assert trial.intermediate_values == {1: 5.0}


def test_searcher_seed_is_deterministic(params: list[SearchParam]) -> None:
    def first_two(seed: int) -> list[dict[str, Any] | None]:
        s = make_searcher(params, ["fid"], ["min"], seed=seed, sampler="random")
        return [s.suggest("a"), s.suggest("b")]

    assert first_two(7) == first_two(7)
    assert first_two(7) != first_two(8)


def test_multi_objective_searcher_with_sqlite_storage(params: list[SearchParam], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/study.db"
    searcher = make_searcher(params, ["fid", "kid"], ["min", "max"], seed=0, storage=url, study_name="sw")
    assert searcher.metric == ["fid", "kid"]
    for i in range(3):
        assert searcher.suggest(f"t{i}") is not None
        searcher.on_trial_complete(f"t{i}", {"fid": float(i), "kid": 1.0 - i})
    searcher.suggest("t3")  # asked, never told
    # The searcher (with its storage) pickles, as Tune does when checkpointing the experiment.
    ckpt = tmp_path / "searcher.pkl"
    searcher.save(str(ckpt))
    restored = make_searcher(params, ["fid", "kid"], ["min", "max"], storage=url, study_name="other")
    restored.restore(str(ckpt))
    restored.on_trial_complete("t3", {"fid": 9.0, "kid": 0.5})
    study = optuna.load_study(study_name="sw", storage=url)
    assert study.directions == [optuna.study.StudyDirection.MINIMIZE, optuna.study.StudyDirection.MAXIMIZE]
    assert [t.values for t in study.trials] == [[0.0, 1.0], [1.0, 0.0], [2.0, -1.0], [9.0, 0.5]]
    assert "kernel.type" in study.trials[0].params
    with pytest.raises(ValueError, match="already exists"):
        make_searcher(params, ["fid"], ["min"], storage=url, study_name="sw")
    assert make_searcher(params, ["fid"], ["min"], storage=url, study_name="sw", load_if_exists=True)


def test_close_orphan_trials(params: list[SearchParam], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/study.db"
    searcher = make_searcher(params, ["fid"], ["min"], seed=0, storage=url, study_name="sw")
    searcher.suggest("done")
    searcher.on_trial_complete("done", {"fid": 1.0})
    searcher.suggest("orphan")
    assert close_orphan_trials(url, "sw") == 1
    states = [t.state for t in optuna.load_study(study_name="sw", storage=url).trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    assert close_orphan_trials(url, "sw") == 0


def test_samplers_and_argument_checks(params: list[SearchParam]) -> None:
    assert isinstance(make_sampler("random", 0, 2), optuna.samplers.RandomSampler)
    assert isinstance(make_sampler("cmaes", 0, 1), optuna.samplers.CmaEsSampler)
    assert isinstance(make_sampler("nsga2", 0, 2), optuna.samplers.NSGAIISampler)
    with pytest.raises(ValueError, match="single objective"):
        make_sampler("cmaes", 0, 2)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("grid", 0, 1)
    with pytest.raises(ValueError, match="one mode per metric"):
        make_searcher(params, ["a", "b"], ["min"])
    with pytest.raises(ValueError, match="'min' or 'max'"):
        make_searcher(params, ["a"], ["minimize"])
    with pytest.raises(ValueError, match="empty search space"):
        make_searcher([], ["a"], ["min"])


def test_define_by_run_pickles(params: list[SearchParam]) -> None:
    space = pickle.loads(pickle.dumps(define_by_run(params)))
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    assert "finetune.lr" in space(trial)


def test_when_may_refer_to_a_later_parameter() -> None:
    params = validate_space(
        {
            "kernel.bandwidth": {"loguniform": [0.25, 4.0], "when": {"kernel.type": "rbf"}},
            "kernel.coef0": {"uniform": [0, 1], "when": {"kernel.degree": 3}},
            "kernel.degree": {"int": [2, 4], "when": {"kernel.type": "polynomial"}},
            "kernel.type": {"choice": ["polynomial", "rbf"]},
        }
    )
    order = [p.key for p in params]
    assert order.index("kernel.type") < order.index("kernel.bandwidth")
    assert order.index("kernel.type") < order.index("kernel.degree") < order.index("kernel.coef0")
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    cfg = define_by_run(params)(trial)
    assert ("kernel.bandwidth" in cfg) == (cfg["kernel.type"] == "rbf")


def test_sorted_yaml_gives_the_same_space(tmp_path: Path) -> None:
    """digits.yaml dumped with sorted keys (kernel.bandwidth before kernel.type) means the same."""
    from mmdsweep.config import load_experiment

    root = Path(__file__).resolve().parents[1]
    original = load_experiment(root / "experiments" / "digits.yaml")
    raw = yaml.safe_load((root / "experiments" / "digits.yaml").read_text())
    sorted_file = tmp_path / "sorted.yaml"
    sorted_file.write_text(yaml.safe_dump(raw, sort_keys=True))
    keys = list(yaml.safe_load(sorted_file.read_text())["search"]["space"])
    assert keys.index("kernel.bandwidth") < keys.index("kernel.type")  # the case that used to fail
    again = load_experiment(sorted_file)
    a = validate_space(original.search.space)
    b = validate_space(again.search.space)
    assert {p.optuna_name: p for p in a} == {p.optuna_name: p for p in b}
    assert param_types(a) == param_types(b)


def test_bool_choice_works_end_to_end(tmp_path: Path) -> None:
    """A bool choice samples real bools and has a results column kind the results module stores."""
    from mmdsweep.config import load_experiment
    from mmdsweep.results import trials_schema

    p = tmp_path / "x.yaml"
    p.write_text("search:\n  space:\n    sampler.clip_sample: {choice: [true, false]}\n")
    exp = load_experiment(p)
    params = validate_space(exp.search.space)
    types = param_types(params)
    assert types == {"sampler.clip_sample": "str"}
    trials_schema(types)  # used to fail: "parameter 'sampler.clip_sample' has type 'bool'"
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(8):
        cfg = define_by_run(params)(study.ask())
        assert isinstance(cfg["sampler.clip_sample"], bool)
        seen.add(exp.with_overrides(cfg).sampler.clip_sample)
    assert seen == {True, False}


# ----------------------------------------------------------------------------- warm start: points_to_evaluate


def test_points_to_evaluate_run_first_in_order_with_the_rest_sampled(params: list[SearchParam]) -> None:
    points = [
        {"kernel.type": "rbf", "kernel.bandwidth": 2.0, "finetune.lr": 3.0e-5},
        {"kernel.type": "imq"},  # the rest sampled
    ]
    searcher = make_searcher(params, ["fid"], ["min"], seed=0, points_to_evaluate=points)
    first, second, third = (searcher.suggest(t) for t in ("a", "b", "c"))
    assert first is not None and second is not None and third is not None
    given = {k: first[k] for k in points[0]}
    assert given == {"finetune.lr": pytest.approx(3.0e-5), "kernel.type": "rbf", "kernel.bandwidth": 2.0}
    assert "sampler.timesteps" in first and "kernel.degree" not in first  # the rest sampled, branches kept
    assert second["kernel.type"] == "imq"
    assert 0.5 <= second["kernel.bandwidth"] <= 2.0 and 1.0e-6 <= second["finetune.lr"] <= 1.0e-4
    assert third != first and third != second
    # the enqueued point is recorded under the branch's Optuna name, as a sampled one would be
    assert searcher._ot_study is not None
    assert searcher._ot_study.trials[0].params["kernel.bandwidth[kernel.type=rbf]"] == 2.0


@pytest.mark.parametrize(
    ("point", "message"),
    [
        ({"kernel.typo": "rbf"}, r"\[0\]\.kernel\.typo: not a key of search\.space"),
        ({"kernel.type": "gaussian"}, r"\[0\]\.kernel\.type: must be one of \['polynomial', 'rbf', 'imq'\]"),
        ({"finetune.lr": 1.0}, r"\[0\]\.finetune\.lr: must be a number in \[1e-06, 0\.0001\], got 1\.0"),
        ({"finetune.lr": "fast"}, r"must be a number in"),
        ({"kernel.bandwidth": 2.0}, r"kernel\.bandwidth: only searched when kernel\.type in \['rbf'\] or"),
        ({"kernel.type": "polynomial", "kernel.bandwidth": 2.0}, r"kernel\.bandwidth: only searched when"),
        ({"kernel.type": "imq", "kernel.bandwidth": 3.0}, r"must be a number in \[0\.5, 2\]"),
        ({}, r"\[0\]: must be a non-empty mapping"),
    ],
)
def test_points_to_evaluate_are_checked(params: list[SearchParam], point: Any, message: str) -> None:
    from mmdsweep.config import points_to_optuna

    with pytest.raises(ValueError, match=message):
        points_to_optuna(params, [point])


def test_points_to_evaluate_in_an_experiment_file(tmp_path: Path) -> None:
    from mmdsweep.config import ConfigError, load_experiment

    space = "search:\n  space:\n    kernel.type: {choice: [polynomial, rbf]}\n"
    good = tmp_path / "good.yaml"
    good.write_text(space + "  points_to_evaluate:\n    - {kernel.type: rbf}\n")
    assert load_experiment(good).search.points_to_evaluate == [{"kernel.type": "rbf"}]
    bad = tmp_path / "bad.yaml"
    bad.write_text(space + "  points_to_evaluate:\n    - {kernel.type: imq}\n")
    with pytest.raises(ConfigError) as err:
        load_experiment(bad)
    assert str(err.value) == (
        f"{bad}: search.points_to_evaluate[0].kernel.type: must be one of ['polynomial', 'rbf'], got 'imq'"
    )
    many = tmp_path / "many.yaml"
    many.write_text(
        space + "  num_samples: 1\n  points_to_evaluate: [{kernel.type: rbf}, {kernel.type: rbf}]\n"
    )
    with pytest.raises(ConfigError, match=r"points_to_evaluate: has 2 points, more than num_samples \(1\)"):
        load_experiment(many)
    lonely = tmp_path / "lonely.yaml"
    lonely.write_text("search:\n  points_to_evaluate:\n    - {kernel.type: rbf}\n")
    with pytest.raises(ConfigError, match="points_to_evaluate: needs a search.space"):
        load_experiment(lonely)
