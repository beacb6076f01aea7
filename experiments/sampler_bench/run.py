"""Sampler benchmark on an analytic Gaussian mixture: error vs NFE, convergence order, wall time, and moment
errors of the stochastic samplers. Writes results.md and error_vs_nfe.png next to this file (or to --out).

    python -m experiments.sampler_bench.run [--quick] [--out DIR]

Every sampler gets the mixture's exact denoiser, so the only error left is the sampler's own discretisation
error (float64 throughout). Deterministic samplers are compared path by path with a DOP853 solve of the
probability-flow ODE from the same starting points; stochastic ones (whose paths depend on the noise) by the
mean and covariance of their samples against the mixture's exact moments.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.sampler_bench.config import get_config
from experiments.sampler_bench.mixture import Mixture, solve_flow
from sdjax import schedules
from sdjax.samplers import SAMPLERS

HERE = pathlib.Path(__file__).parent
TO_ZERO = "karras, to sigma=0"  # the whole grid including the final jump sigma_min -> 0


# ------------------------------------------------------------------------------------------ the problem

def make_denoiser(mixture, counter=None):
    """The exact denoiser in jax; with a counter list, every evaluation at run time appends to it."""

    def denoise(x, sigma):
        if counter is not None:
            jax.debug.callback(lambda: counter.append(1))
        return mixture.denoise(jnp, x, sigma)

    return denoise


def compiled_sampler(name, denoise, **options):
    """The sampler jitted with the grid as a traced argument: one compile per grid length, for all schedules."""
    return jax.jit(lambda x, sigmas, key: SAMPLERS[name](denoise, x, sigmas, key, **options))


def counted_sampler(name, mixture, **options):
    """(x, sigmas, key) -> (output, NFE), the NFE counted at run time (adaptive steps, grids ending above 0)."""
    counter = []
    run = compiled_sampler(name, make_denoiser(mixture, counter), **options)

    def call(x, sigmas, key):
        counter.clear()
        output = run(x, sigmas, key).block_until_ready()
        jax.effects_barrier()  # every debug callback has run
        return np.asarray(output), len(counter)

    return call


def is_deterministic(run, x, sigmas) -> bool:
    """True when the output does not depend on the PRNG key (checked, not assumed from the name)."""
    return bool(jnp.array_equal(run(x, sigmas, jax.random.key(1)), run(x, sigmas, jax.random.key(2))))


def rms_error(x, reference) -> float:
    """Root mean square over paths of the Euclidean distance to the reference endpoint."""
    return float(np.sqrt(np.mean(np.sum((np.asarray(x) - reference) ** 2, axis=-1))))


def moment_errors(samples, mixture) -> tuple[float, float]:
    """(|mean - exact mean|, ||cov - exact cov||_F / ||exact cov||_F)."""
    samples = np.asarray(samples)
    exact_cov = mixture.covariance()
    mean_error = np.linalg.norm(samples.mean(0) - mixture.mean())
    cov_error = np.linalg.norm(np.cov(samples, rowvar=False) - exact_cov) / np.linalg.norm(exact_cov)
    return float(mean_error), float(cov_error)


def wall_time(run, x, sigmas, key, repeats) -> float:
    """Best-of-`repeats` seconds per call of an already compiled function."""
    run(x, sigmas, key).block_until_ready()  # warm-up: compiles on a new grid length
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x, sigmas, key).block_until_ready()
        times.append(time.perf_counter() - start)
    return min(times)


def fit_order(points, min_steps, floor) -> float:
    """Convergence order p in error ~ NFE^-p: least-squares slope of log error against log NFE over the
    asymptotic points (steps >= min_steps, error above the round-off floor)."""
    kept = [(p["nfe"], p["error"]) for p in points if p["steps"] >= min_steps and p["error"] > floor]
    if len(kept) < 2:
        return math.nan
    log_nfe, log_error = np.log(np.array(kept, np.float64)).T
    return float(-np.polyfit(log_nfe, log_error, 1)[0])


# -------------------------------------------------------------------------------------- measurements

def classify_samplers(mixture, table):
    """Split SAMPLERS into deterministic fixed-step, adaptive (nfe is None) and stochastic ones."""
    x = jnp.asarray(mixture.sample(np.random.default_rng(0), 4, table[-1]))
    sigmas = schedules.karras(4, table[0], table[-1])
    deterministic, adaptive, stochastic = [], [], []
    for name in sorted(SAMPLERS):
        if not is_deterministic(compiled_sampler(name, make_denoiser(mixture)), x, sigmas):
            stochastic.append(name)
        elif SAMPLERS[name].nfe is None:
            adaptive.append(name)
        else:
            deterministic.append(name)
    return deterministic, adaptive, stochastic


def run_deterministic(config, mixture, table, names, x_start, reference):
    """Per (sampler, schedule, steps): the ODE error on the grid without its final 0 (the solver's order), and
    for karras also the sample error on the whole grid, whose last jump sigma_min -> 0 is a single step."""
    key = jax.random.key(0)
    rows = []
    for name in names:
        run = counted_sampler(name, mixture)
        for schedule in config["schedules"]:
            for steps in config["steps"]:
                sigmas = schedules.get_schedule(schedule)(steps, table)
                targets = [(schedule, sigmas[:-1])] + ([(TO_ZERO, sigmas)] if schedule == "karras" else [])
                for label, grid in targets:
                    output, nfe = run(x_start, grid, key)
                    error = rms_error(output, reference(float(grid[0]), float(grid[-1])))
                    rows.append({"sampler": name, "schedule": label, "steps": steps, "nfe": nfe, "error": error})
        timing_grid = schedules.karras(config["timing_steps"], table[0], table[-1])
        seconds = wall_time(compiled_sampler(name, make_denoiser(mixture)), x_start, timing_grid, key,
                            config["timing_repeats"])
        rows.append({"sampler": name, "schedule": "timing", "steps": config["timing_steps"], "seconds": seconds})
        print(f"  {name}", flush=True)
    return rows


def run_adaptive(config, mixture, table, names, x_start, reference):
    """Sample error and counted NFE of adaptive samplers over a tolerance sweep (grid: karras' two ends, 0)."""
    sigmas = schedules.karras(2, table[0], table[-1])
    rows = []
    for name in names:
        for rtol in config["adaptive_rtols"]:
            output, nfe = counted_sampler(name, mixture, rtol=rtol)(x_start, sigmas, jax.random.key(0))
            rows.append({"sampler": name, "rtol": rtol, "nfe": nfe,
                         "error": rms_error(output, reference(float(sigmas[0]), 0.0))})
    return rows


def run_stochastic(config, mixture, table, names, seed):
    """Moment errors of stochastic samplers on karras grids, from exact samples of the noised prior."""
    x_start = jnp.asarray(mixture.sample(np.random.default_rng(seed + 1), config["stochastic_samples"], table[-1]))
    rows = []
    for name in names:
        run = counted_sampler(name, mixture)
        for steps in config["stochastic_steps"]:
            output, nfe = run(x_start, schedules.karras(steps, table[0], table[-1]), jax.random.key(seed))
            mean_error, cov_error = moment_errors(output, mixture)
            rows.append({"sampler": name, "steps": steps, "nfe": nfe, "mean_error": mean_error,
                         "cov_error": cov_error})
    exact = mixture.sample(np.random.default_rng(seed + 2), config["stochastic_samples"])
    floor = dict(zip(("mean_error", "cov_error"), moment_errors(exact, mixture)))
    return rows, floor


# --------------------------------------------------------------------------------------------- report

def _git_revision() -> str:
    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                  cwd=HERE, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "sdjax", str(HERE)], capture_output=True,
                               text=True, cwd=HERE, check=True).stdout.strip()
        return revision + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _curves(rows, sampler, schedule):
    return [r for r in rows if r["sampler"] == sampler and r["schedule"] == schedule]


def _error_cells(curve):
    return [f"{r['error']:.2e} ({r['nfe']})" for r in curve]


def write_markdown(path, config, table, deterministic, adaptive, stochastic, floor, elapsed):
    samplers = sorted({r["sampler"] for r in deterministic})
    def fit(name, schedule):
        return fit_order(_curves(deterministic, name, schedule), config["order_fit_min_steps"],
                         config["error_floor"])

    seconds = {r["sampler"]: r["seconds"] for r in deterministic if r["schedule"] == "timing"}
    steps_header = [f"{s} steps" for s in config["steps"]]
    by_order = sorted(samplers, key=lambda name: -np.nan_to_num(fit(name, "karras")))
    ode_rows = [[name, f"{fit(name, 'karras'):.2f}"] + _error_cells(_curves(deterministic, name, "karras"))
                + [f"{1e3 * seconds[name]:.2f}"] for name in by_order]
    sample_rows = [[name, f"{fit(name, TO_ZERO):.2f}"] + _error_cells(_curves(deterministic, name, TO_ZERO))
                   for name in by_order]
    order_rows = [[name] + [f"{fit(name, s):.2f}" for s in config["schedules"]] for name in by_order]
    middle = config["steps"][len(config["steps"]) // 2]
    middle_rows = [[name] + [f"{r['error']:.1e}" for s in config["schedules"] for r in _curves(deterministic, name, s)
                             if r["steps"] == middle] for name in by_order]
    adaptive_rows = [[r["sampler"], r["rtol"], r["nfe"], f"{r['error']:.2e}"] for r in adaptive]
    stochastic_rows = [[r["sampler"], r["steps"], r["nfe"], f"{r['mean_error']:.4f}", f"{r['cov_error']:.4f}"]
                       for r in stochastic]
    stochastic_rows.append(["exact data samples (Monte-Carlo floor)", "-", "-", f"{floor['mean_error']:.4f}",
                            f"{floor['cov_error']:.4f}"])
    text = f"""# Sampler benchmark: analytic Gaussian mixture

Regenerate: `python -m experiments.sampler_bench.run` (see README.md). Plot: `error_vs_nfe.png`.

**Problem.** A {config['mixture']['components']}-component Gaussian mixture in {config['mixture']['dim']}-D with
diagonal covariances; every sampler gets its exact denoiser E[x0 | x], so all error is the sampler's own.
Noise range and discrete tables are Stable Diffusion's ({config['model_schedule']['beta_schedule']}, sigma
{table[0]:.4f} to {table[-1]:.4f}). Arithmetic float64; {config['samples']} paths from exact samples of the noised
marginal at sigma_max.

**Error.** RMS over paths of |x_sampler - x_exact|, x_exact from a DOP853 solve of the probability-flow ODE
(rtol = atol = {config['reference_tolerance']:g}) over the same sigma interval. *ODE error*: the grid without its
final 0, so the sampler integrates the ODE from sigma_max to the grid's last positive sigma; this is what the
convergence order measures. *Sample error*: the whole grid down to sigma = 0, whose last jump sigma_min -> 0 is a
single step for most samplers and sets an error floor that no step count removes. **Order**: least-squares slope of
log error against log NFE over steps >= {config['order_fit_min_steps']} and error > {config['error_floor']:g}.
**NFE** is counted at run time. Cells: error (NFE).

## ODE error on the karras schedule (sorted by fitted order)

{_table(["sampler", "order"] + steps_header + [f"ms/call ({config['timing_steps']} steps, to 0)"], ode_rows)}

## Sample error on the karras schedule, down to sigma = 0

{_table(["sampler", "order"] + steps_header, sample_rows)}

## Fitted order of the ODE error by schedule

{_table(["sampler"] + config["schedules"], order_rows)}

## ODE error at {middle} steps by schedule

{_table(["sampler"] + config["schedules"], middle_rows)}

## Adaptive samplers: sample error over a tolerance sweep

{_table(["sampler", "rtol", "NFE", "sample error"], adaptive_rows)}

## Stochastic samplers: moment errors on karras, down to sigma = 0 ({config['stochastic_samples']} samples)

Default options. Mean error |mean - exact|; covariance error ||cov - exact||_F / ||exact||_F. The last row is the
Monte-Carlo noise of as many exact data samples: values near it mean the bias is below what this sample size
resolves.

{_table(["sampler", "steps", "NFE", "mean error", "cov error"], stochastic_rows)}

## Run

git revision {_git_revision()}; seed {config['seed']}; {jax.devices()[0].platform} backend; {elapsed:.0f} s wall
time. Resolved config:

```json
{json.dumps(config, indent=1)}
```
"""
    path.write_text(text)


def plot(path, config, deterministic, stochastic, floor):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = config["schedules"] + [TO_ZERO, "stochastic"]
    columns = 3
    grid_rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(grid_rows, columns, figsize=(5.2 * columns, 3.9 * grid_rows), squeeze=False)
    samplers = sorted({r["sampler"] for r in deterministic})
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(samplers), 2)))
    for ax, panel in zip(axes.flat, panels):
        if panel == "stochastic":
            for color, name in zip(plt.get_cmap("tab10").colors, sorted({r["sampler"] for r in stochastic})):
                curve = [r for r in stochastic if r["sampler"] == name]
                ax.loglog([r["nfe"] for r in curve], [r["cov_error"] for r in curve], "o-", color=color, label=name)
            ax.axhline(floor["cov_error"], color="black", linestyle=":", label="Monte-Carlo floor")
            ax.set_title("stochastic, karras: covariance rel. error")
        else:
            for i, (color, name) in enumerate(zip(colors, samplers)):
                curve = _curves(deterministic, name, panel)
                ax.loglog([r["nfe"] for r in curve], [r["error"] for r in curve], marker="os^vD"[i % 5], ms=3,
                          linestyle=["-", "--", ":"][i % 3], color=color, label=name)
            ax.set_title(f"{panel}: {'sample' if panel == TO_ZERO else 'ODE'} error")
        ax.set_xlabel("NFE")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run (seconds)")
    parser.add_argument("--out", type=pathlib.Path, default=HERE, help="where results.md and the plot go")
    args = parser.parse_args()
    config = get_config(quick=args.quick)
    began = time.perf_counter()

    with jax.enable_x64(config["dtype"] == "float64"):
        mixture = Mixture.random(config["seed"], **config["mixture"])
        table = schedules.sigma_table(schedules.alphas_cumprod_from_config(config["model_schedule"]))
        start_points = mixture.sample(np.random.default_rng(config["seed"]), config["samples"], table[-1])
        solutions = {}  # (sigma_start, sigma_end) -> exact ODE solution from start_points

        def reference(sigma_start, sigma_end):
            if (sigma_start, sigma_end) not in solutions:
                solutions[sigma_start, sigma_end] = solve_flow(mixture, start_points, sigma_start, sigma_end,
                                                               tolerance=config["reference_tolerance"])
            return solutions[sigma_start, sigma_end]

        deterministic_names, adaptive_names, stochastic_names = classify_samplers(mixture, table)
        print(f"deterministic: {deterministic_names}\nadaptive: {adaptive_names}\nstochastic: {stochastic_names}")
        x_start = jnp.asarray(start_points)
        deterministic = run_deterministic(config, mixture, table, deterministic_names, x_start, reference)
        adaptive = run_adaptive(config, mixture, table, adaptive_names, x_start, reference)
        stochastic, floor = run_stochastic(config, mixture, table, stochastic_names, config["seed"])

    args.out.mkdir(parents=True, exist_ok=True)
    write_markdown(args.out / "results.md", config, table, deterministic, adaptive, stochastic, floor,
                   time.perf_counter() - began)
    plot(args.out / "error_vs_nfe.png", config, deterministic, stochastic, floor)
    print(f"wrote {args.out / 'results.md'} and {args.out / 'error_vs_nfe.png'}")


if __name__ == "__main__":
    main()
