"""Run a grid of variants ("arms") over seeds, resumably, and summarise it with error bars.

    python -m experiments.ablate experiments/ablations/min_snr.py                 # run the grid, then summarise
    python -m experiments.ablate experiments/ablations/min_snr.py --shard 0/2     # this process's half of it
    python -m experiments.ablate experiments/ablations/min_snr.py --summarise     # only the tables and plot

A study file defines `get_study() -> Study`: the arms (each a few `key=value` overrides), the seeds, and the
function that measures one (arm, seed) run in its own directory and returns rows such as {"step": 500,
"adherence": 0.41}. Every (arm, seed) pair is one run directory, <out>/<arm>/seed_<seed>, holding run.json (arm,
overrides, seed, git revision) and, once finished, result.json; a finished run is never redone, so a killed grid
continues where it stopped, and `--shard i/n` runs every n-th pair so that n processes (or hosts sharing the
folder) split a grid. The summary (summary.json, summary.md, summary.png) is the mean and standard error over
seeds of each metric per arm at each x, computed from the result files alone: it does not depend on which
process ran what.

`training_runs` makes the run function of a training study: `sdjax.train` on a config file with the arm's
overrides and the seed, its evaluator called every eval_every steps (the convergence curve), resumable from its
checkpoints like any training run.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class Run:
    """One (arm, seed) of a study, and the directory it owns."""
    arm: str
    seed: int
    overrides: tuple[str, ...]
    directory: Path


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    arms: dict[str, tuple[str, ...]]        # arm name -> overrides
    seeds: tuple[int, ...]
    run: Callable[[Run], list[dict]]        # rows, each {x: value, metric: value, ...}
    x: str                                  # the row key the curves run along ("step", "nfe")
    metrics: tuple[str, ...]                # the row keys summarised
    table_x: tuple = ()                     # x values shown in summary.md (default: all)
    description: str = ""                   # the study's question, at the top of summary.md
    log_scale: tuple[str, ...] = ()         # metrics plotted on a log axis (errors spanning decades)
    out: str = ""                           # default output folder

    def pairs(self) -> list[tuple[str, int]]:
        return [(arm, seed) for arm in self.arms for seed in self.seeds]


def load_study(path: str | Path) -> Study:
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"study file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"study_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_study"):
        raise SystemExit(f"{path} defines no get_study() returning an experiments.ablate.Study")
    return module.get_study()


def parse_shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        index, count = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected i/n, e.g. 0/2") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: i must be in 0..n-1")
    return index, count


def _write_json(path: Path, value) -> None:
    """Written next to `path` and moved into place, so a killed process never leaves half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(partial, path)


def run_directory(out: Path, arm: str, seed: int) -> Path:
    return out / arm / f"seed_{seed}"


def run_grid(study: Study, out: Path, shard: tuple[int, int] = (0, 1), log=print) -> list[Path]:
    """Run this shard's unfinished (arm, seed) pairs in order; returns the directories it ran."""
    from sdjax.train.loop import git_revision

    index, count = shard
    ran = []
    for arm, seed in study.pairs()[index::count]:
        directory = run_directory(out, arm, seed)
        if (directory / "result.json").is_file():
            log(f"{arm} seed {seed}: finished earlier")
            continue
        directory.mkdir(parents=True, exist_ok=True)
        _write_json(directory / "run.json", {
            "study": study.name, "arm": arm, "seed": seed, "overrides": list(study.arms[arm]),
            "git_revision": git_revision(), "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")})
        log(f"{arm} seed {seed}: running in {directory}")
        rows = study.run(Run(arm, seed, tuple(study.arms[arm]), directory))
        _write_json(directory / "result.json", {"arm": arm, "seed": seed, "rows": rows})
        ran.append(directory)
    return ran


def mean_and_error(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for one value)."""
    values = np.asarray(values, np.float64)
    error = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return float(np.mean(values)), error


def summarise(study: Study, out: Path) -> dict:
    """{"arms": {arm: {metric: [{x, mean, error, seeds}]}}} from the finished runs' result files."""
    finished = [p for p in (run_directory(out, a, s) / "result.json" for a, s in study.pairs()) if p.is_file()]
    results = [json.loads(p.read_text()) for p in finished]
    arms = {}
    for arm in study.arms:
        rows = [row for r in results if r["arm"] == arm for row in r["rows"]]
        arms[arm] = {}
        for metric in study.metrics:
            by_x: dict = {}
            for row in rows:
                if metric in row:
                    by_x.setdefault(row[study.x], []).append(row[metric])
            arms[arm][metric] = [{study.x: x, "mean": m, "error": e, "seeds": len(v)}
                                 for x, v in sorted(by_x.items()) for m, e in [mean_and_error(v)]]
    return {"study": study.name, "x": study.x, "runs_finished": len(results), "runs": len(study.pairs()),
            "seeds": list(study.seeds), "arms": arms}


def markdown(study: Study, summary: dict) -> str:
    x = study.x
    lines = [f"# {study.name}\n"]
    if study.description:
        lines.append(study.description.strip() + "\n")
    lines.append(f"Mean ± standard error over seeds {summary['seeds']} ({summary['runs_finished']} of "
                 f"{summary['runs']} runs finished).\n")
    for metric in study.metrics:
        shown = study.table_x or sorted({p[x] for arm in summary["arms"].values() for p in arm[metric]})
        lines += [f"## {metric}\n", "| arm | " + " | ".join(f"{x} {v}" for v in shown) + " |",
                  "|---" * (len(shown) + 1) + "|"]
        for arm, metrics in summary["arms"].items():
            points = {p[x]: p for p in metrics[metric]}
            cells = [f"{points[v]['mean']:.4g} ± {points[v]['error']:.2g}" if v in points else "–" for v in shown]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(study: Study, summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(study.metrics), figsize=(4.6 * len(study.metrics), 3.8), squeeze=False)
    for axis, metric in zip(axes[0], study.metrics):
        for arm, metrics in summary["arms"].items():
            points = metrics[metric]
            if not points:
                continue
            xs = np.asarray([p[study.x] for p in points], np.float64)
            mean, error = (np.asarray([p[k] for p in points]) for k in ("mean", "error"))
            axis.plot(xs, mean, marker="o", markersize=3, label=arm)
            axis.fill_between(xs, mean - error, mean + error, alpha=0.25)
        axis.set(xlabel=study.x, ylabel=metric, title=metric, yscale="log" if metric in study.log_scale else "linear")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_summary(study: Study, out: Path) -> dict:
    summary = summarise(study, out)
    _write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(markdown(study, summary))
    plot(study, summary, out / "summary.png")
    return summary


# ------------------------------------------------------------------------------------------ training studies

def training_runs(config_file: str | Path, evaluate: Callable) -> Callable[[Run], list[dict]]:
    """The run function of a training study: train `config_file` with the arm's overrides and seed=<seed> in the
    run directory, calling `evaluate(pipeline) -> {metric: value}` every eval_every steps. Rows are the
    evaluations, {"step": s, metric: value}; metrics of the raw weights (eval_raw_weights) get a "_raw" suffix."""
    from sdjax.train.config import load_config
    from sdjax.train.loop import train

    def run(spec: Run) -> list[dict]:
        config = load_config(config_file, [*spec.overrides, f"seed={spec.seed}"])
        result = train(config, spec.directory, evaluate=evaluate)
        if result.stopped_by_signal:
            raise SystemExit(f"{spec.directory}: stopped by {result.stopped_by_signal}; rerun to continue")
        rows: dict[int, dict] = {}
        for line in (spec.directory / "eval.jsonl").read_text().splitlines():
            row = json.loads(line)
            suffix = "" if row.pop("weights") == "ema" else "_raw"
            step = row.pop("step")
            rows.setdefault(step, {"step": step}).update({k + suffix: v for k, v in row.items()})
        return [rows[step] for step in sorted(rows)]

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="a study file defining get_study()")
    parser.add_argument("--out", default=None, help="the grid's folder (default: the study's own)")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="I/N",
                        help="run only every N-th (arm, seed) pair starting at I")
    parser.add_argument("--summarise", action="store_true", help="only write the summary of the finished runs")
    args = parser.parse_args(argv)
    study = load_study(args.study)
    out = Path(args.out or study.out or Path("runs/ablations") / study.name)
    if not args.summarise:
        run_grid(study, out, args.shard, log=lambda text: print(text, flush=True))
    summary = write_summary(study, out)
    print(f"{summary['runs_finished']} of {summary['runs']} runs finished; wrote {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
