"""Fuzzing the experiment loader: whatever the file holds, the answer is an Experiment or one line.

Starting from every ``experiments/*.yaml``, hypothesis mutates the file (values of other types,
out-of-range numbers, nan/inf, huge integers, unknown and misspelt keys, deleted keys, sections of
the wrong shape, broken search specs, non-UTF-8 bytes, YAML tags, random unicode) and calls
:func:`load_experiment`. It must return an :class:`Experiment` or raise a :class:`ConfigError`
whose message is exactly one line starting with the file's path; any other exception fails.

Budget: ``EXAMPLES_PER_FILE`` = 150 examples for each of the 4 experiment files (600 in all),
derandomized, about 10-20 s on one core. The CLI test drives ``python -m mmdsweep.tune --dry-run``
and ``python -m mmdsweep.pretrain --dry-run`` as subprocesses for three kinds of bad file (each
process imports torch: ~10 s of CPU), and ``mmdsweep.tune.main([..., "--dry-run"])`` in-process for
every kind.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmdsweep.config import ConfigError, Experiment, load_experiment

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
EXAMPLES_PER_FILE = 150

# ----------------------------------------------------------------------------- strategies

huge_ints = st.sampled_from([2**63, -(2**63) - 1, 10**400, -(10**400)])
numbers = st.one_of(
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    huge_ints,
    st.sampled_from([0, -1, 1, 0.5, 1.5, 1e-300, 1e300, float("nan"), float("inf"), -float("inf")]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    numbers,
    st.text(max_size=12),
    st.sampled_from(["1e-5", "nan", "inf", ".inf", "yes", "torchvision:", "torchvision:nope", "", "cuda:x"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), inner, max_size=3),
    ),
    max_leaves=6,
)
dist_specs = st.one_of(
    st.builds(
        lambda k, v: {k: v}, st.sampled_from(["uniform", "loguniform", "int"]), st.lists(numbers, max_size=3)
    ),
    st.fixed_dictionaries({"choice": st.lists(scalars, max_size=4)}),
    st.fixed_dictionaries(
        {
            "choice": st.lists(scalars, min_size=1, max_size=3),
            "when": st.dictionaries(st.text(max_size=12), values),
        }
    ),
    values,
)
TAGS = [
    "!!python/object/apply:os.system ['true']",
    "!!python/name:os.system",
    "!custom x",
    "!!binary aGk=",
    "!!set {a}",
]


def _paths(d: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path of a nested mapping (mappings and leaves)."""
    out: list[tuple[Any, ...]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            out.append((*prefix, k))
            out += _paths(v, (*prefix, k))
    return out


def _parent(d: dict[Any, Any], path: tuple[Any, ...]) -> dict[Any, Any]:
    cur = d
    for k in path[:-1]:
        cur = cur[k]
    return cur


@st.composite
def mutated_file(draw: st.DrawFn, base: dict[str, Any]) -> bytes:
    """A YAML file: ``base`` with a few structural mutations, sometimes then damaged as bytes."""
    d = copy.deepcopy(base)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = _paths(d)
        op = draw(st.sampled_from(["set", "delete", "unknown", "misspell", "shape", "search", "section"]))
        if op == "section":
            d[draw(st.sampled_from(["finetune", "sampler", "eval", "resources", "search", "bogus"]))] = draw(
                values
            )
        elif op == "search":
            space = d.setdefault("search", {})
            if isinstance(space, dict):
                space = space.setdefault("space", {})
            if isinstance(space, dict):
                key = draw(
                    st.sampled_from(
                        [
                            "finetune.lr",
                            "sampler.eta",
                            "sampler.timesteps",
                            "sampler.clip_sample",
                            "kernel.type",
                        ]
                        + ["features.train", "finetune.lora.rank", "nope.key", "kernel.bandwidth"]
                    )
                )
                space[key] = draw(dist_specs)
        elif not paths:
            continue
        else:
            path = draw(st.sampled_from(paths))
            parent = _parent(d, path)
            if op == "set":
                parent[path[-1]] = draw(values)
            elif op == "delete":
                del parent[path[-1]]
            elif op == "unknown":
                parent[draw(st.one_of(st.text(min_size=1, max_size=10), st.integers()))] = draw(values)
            elif op == "misspell":
                parent[f"{path[-1]}x"] = parent.pop(path[-1])
            elif op == "shape":
                parent[path[-1]] = draw(st.sampled_from([[], [1, 2], "text", 3, None, {"a": 1}]))
    text = yaml.safe_dump(d, sort_keys=draw(st.booleans()), allow_unicode=draw(st.booleans()))
    data = text.encode("utf-8")
    damage = draw(st.sampled_from(["none", "none", "none", "bytes", "tag", "unicode", "truncate"]))
    if damage == "bytes":
        at = draw(st.integers(min_value=0, max_value=len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    elif damage == "tag":
        data += f"zz_tagged: {draw(st.sampled_from(TAGS))}\n".encode()
    elif damage == "unicode":
        at = draw(st.integers(min_value=0, max_value=len(text)))
        data = (text[:at] + draw(st.text(min_size=1, max_size=8)) + text[at:]).encode(
            "utf-8", "surrogatepass"
        )
    elif damage == "truncate":
        data = data[: draw(st.integers(min_value=0, max_value=len(data)))]
    return data


def _check_load(path: Path) -> None:
    try:
        exp = load_experiment(path)
    except ConfigError as e:
        msg = str(e)
        assert len(msg.splitlines()) == 1, msg
        assert msg.startswith(f"{path}: "), msg
    else:
        assert isinstance(exp, Experiment)


# ----------------------------------------------------------------------------- the fuzz


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.stem)
def test_loader_fuzz(experiment: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """150 derandomized examples per experiment file (see the module docstring)."""
    base = yaml.safe_load(experiment.read_text())
    target = tmp_path_factory.mktemp("fuzz") / "experiment.yaml"

    @settings(
        max_examples=EXAMPLES_PER_FILE,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mutated_file(base))
    def run(data: bytes) -> None:
        target.write_bytes(data)
        _check_load(target)

    run()


def test_every_experiment_file_loads() -> None:
    for p in EXPERIMENTS:
        assert isinstance(load_experiment(p), Experiment)


# ----------------------------------------------------------------------------- the real CLIs


def _digits_text(out: Path) -> str:
    text = (ROOT / "experiments" / "digits.yaml").read_text()
    text = text.replace("spacing: uniform", "timestep_spacing: leading")  # no deprecation note on stderr
    return text.replace("dir: results/digits", f"dir: {out}")


def _edited(text: str, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """The digits experiment with one structural edit, re-dumped (robust to the file's values)."""
    doc = yaml.safe_load(text)
    edit(doc)
    return yaml.safe_dump(doc, sort_keys=False).encode()


def _rename(section: dict[str, Any], old: str, new: str) -> None:
    section[new] = section.pop(old)


BAD_FILES = {
    "bad_value": lambda t: _edited(t, lambda d: d["finetune"].update(lr=float("inf"))),
    "unknown_key": lambda t: _edited(t, lambda d: _rename(d["finetune"], "grad_clip", "grad_clipp")),
    "bad_search_value": lambda t: _edited(
        t, lambda d: d["search"]["space"].update({"sampler.eta": {"choice": [0, 2]}})
    ),
    "cycle": lambda t: _edited(
        t,
        lambda d: d["search"]["space"].update(
            {"kernel.type": {"choice": ["polynomial", "rbf"], "when": {"kernel.bandwidth": 1}}}
        ),
    ),
    "bad_point": lambda t: _edited(
        t, lambda d: d["search"].update(points_to_evaluate=[{"kernel.type": "gaussian"}])
    ),
    "not_utf8": lambda t: t.encode("utf-8") + b"name: \xff\xfe\n",
    "invalid_yaml": lambda t: (t + "data: [1, 2\n").encode(),
    "yaml_tag": lambda t: (t + "extra: !!python/object/apply:os.system ['echo hacked']\n").encode(),
    "not_a_mapping": lambda t: b"- just\n- a list\n",
}


# Each CLI process imports torch (tens of seconds on a busy 2-core machine): a handful of kinds as
# subprocesses here, every kind of bad file in-process below.
@pytest.mark.parametrize(
    ("module", "kind"),
    [("mmdsweep.tune", "bad_search_value"), ("mmdsweep.tune", "not_utf8"), ("mmdsweep.pretrain", "yaml_tag")],
)
def test_cli_rejects_bad_files_with_one_line(tmp_path: Path, module: str, kind: str) -> None:
    out = tmp_path / "out"
    bad = tmp_path / "BAD.yaml"
    bad.write_bytes(BAD_FILES[kind](_digits_text(out)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", module, str(bad), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(bad) in lines[0]
    assert not out.exists()
    assert "hacked" not in proc.stdout


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_tune_main_rejects_every_kind_in_process(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from mmdsweep import tune

    out = tmp_path / "out"
    bad = tmp_path / "BAD.yaml"
    bad.write_bytes(BAD_FILES[kind](_digits_text(out)))
    assert tune.main([str(bad), "--dry-run"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0]
    assert not out.exists()
