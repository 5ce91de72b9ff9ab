"""What Ray costs: the same fine-tuning trial run bare (in-process ``run_finetune``) and through
Ray Tune + Ray Train with one worker, at two step counts.

From the two step counts, a line ``time = fixed + steps * per_step`` is fitted for each way of
running; the table reports the fixed start-up cost (seconds) and the per-step overhead (percent)
of Tune + Train over the bare loop, plus ``ray.init`` itself. Everything runs in one process, one
after the other; each measurement is the fastest of ``--repeats`` runs, which damps the noise of
a shared machine.

    python benchmarks/ray_overhead.py [experiments/digits.yaml] [--steps 10 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", nargs="?", default=str(ROOT / "experiments" / "digits.yaml"))
    ap.add_argument("--steps", type=int, nargs=2, default=[10, 30])
    from mmdsweep.config import add_set_argument

    add_set_argument(ap)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ray_overhead.md"))
    args = ap.parse_args()

    import torch

    from mmdsweep.config import load_experiment, parse_override
    from mmdsweep.sweep import raytrain
    from mmdsweep.train.loop import LocalReporter, run_finetune
    from mmdsweep.tune import prepare_caches, worker_loop
    from mmdsweep.utils import markdown_table

    base = load_experiment(args.experiment, dict(parse_override(s) for s in args.set))
    base = base.with_overrides(
        {"resources.num_workers": 1, "eval.num_samples": min(base.eval.num_samples, 128)}
    )
    prepare_caches(base, [])  # pretraining, feature banks and reference statistics are not what we measure
    threads = max(1, int(base.resources.cpus_per_worker))
    work = Path(tempfile.mkdtemp(prefix="mmdsweep-ray-overhead-"))
    rows: list[dict[str, Any]] = []
    bare: dict[int, float] = {}
    for n in args.steps:
        exp = base.with_overrides(
            {"finetune.steps": n, "finetune.eval_every": n, "finetune.threads": threads}
        )
        torch.set_num_threads(threads)
        for r in range(args.repeats):
            t0 = time.perf_counter()
            run_finetune(exp, LocalReporter(work / f"bare-{n}-{r}"), allow_pretrain=False)
            bare[n] = min(bare.get(n, float("inf")), time.perf_counter() - t0)
        print(f"bare, {n} steps: {bare[n]:.1f} s", flush=True)

    t0 = time.perf_counter()
    raytrain.init_ray(None, base.resources.num_cpus, base.resources.object_store_memory)
    init_s = time.perf_counter() - t0
    from ray import tune

    ray_t: dict[int, float] = {}
    for n in args.steps:
        exp = base.with_overrides({"finetune.steps": n, "finetune.eval_every": n})
        trainable = raytrain.make_trial_trainable(
            worker_loop,
            num_workers=1,
            use_gpu=False,
            cpus_per_worker=exp.resources.cpus_per_worker,
            gpus_per_worker=0.0,
            max_failures=0,
            storage_path=str(work / "ray"),
            base_loop_config={"experiment": exp.to_dict(), "source": exp.source},
            trial_cpus=exp.resources.trial_cpus,
        )
        for r in range(args.repeats):
            tuner = tune.Tuner(
                trainable,
                param_space={},
                tune_config=tune.TuneConfig(num_samples=1),
                run_config=tune.RunConfig(
                    name=f"overhead-{n}-{r}", storage_path=str(work / "ray"), verbose=0
                ),
            )
            t0 = time.perf_counter()
            grid = tuner.fit()
            ray_t[n] = min(ray_t.get(n, float("inf")), time.perf_counter() - t0)
            assert not grid.errors, grid.errors
        print(f"Tune + Train (1 worker), {n} steps: {ray_t[n]:.1f} s", flush=True)

    n1, n2 = args.steps

    def fit(times: dict[int, float]) -> tuple[float, float]:
        per = (times[n2] - times[n1]) / (n2 - n1)
        return times[n1] - per * n1, per

    fixed_b, per_b = fit(bare)
    fixed_r, per_r = fit(ray_t)
    for n in args.steps:
        rows.append({"steps": n, "bare_s": bare[n], "tune_train_s": ray_t[n], "ratio": ray_t[n] / bare[n]})
    summary = [
        {"quantity": "ray.init (local, with dashboard)", "value": f"{init_s:.1f} s"},
        {"quantity": "fixed cost, bare", "value": f"{fixed_b:.1f} s"},
        {"quantity": "fixed cost, Tune + Train", "value": f"{fixed_r:.1f} s"},
        {"quantity": "start-up overhead of Tune + Train", "value": f"{fixed_r - fixed_b:.1f} s"},
        {"quantity": "per step, bare", "value": f"{per_b:.3f} s"},
        {"quantity": "per step, Tune + Train", "value": f"{per_r:.3f} s"},
        {"quantity": "per-step overhead", "value": f"{100 * (per_r - per_b) / per_b:+.1f} %"},
    ]
    text = "\n".join(
        [
            f"# Ray overhead (1 worker, {threads} thread(s), batch {base.finetune.batch_size}, "
            f"T={base.sampler.timesteps}, {time.strftime('%Y-%m-%d')})",
            "",
            markdown_table(rows, floatfmt=".2f"),
            "",
            markdown_table(summary),
            "",
            "Both ways build the same model, feature space and evaluator and run one evaluation at the end;",
            "the caches (pretrained model, feature banks, reference statistics) were filled beforehand.",
        ]
    )
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
