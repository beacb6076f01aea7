"""Sampler benchmark on an analytic Gaussian mixture: error vs NFE, convergence order, wall time, and moment
errors of the stochastic samplers. Writes results.md and error_vs_nfe.png next to this file (or to --out).

    python -m experiments.sampler_bench.run [--quick] [--out DIR]

Every sampler gets the mixture's exact denoiser, so the only error left is the sampler's own discretisation
error (float64 throughout). Deterministic samplers (and deterministic settings of stochastic ones, the
configured variants) are compared path by path with a DOP853 solve of the probability-flow ODE from the same
starting points; stochastic ones (whose paths depend on the noise) by the mean and covariance of their samples
against the mixture's exact moments. numpy reimplementations of two multistep samplers test what limits their
asymptotic order.
"""
from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from numpy.polynomial import polynomial

from experiments.sampler_bench.config import get_config, karras_steps
from experiments.sampler_bench.mixture import Mixture, solve_flow
from experiments.sampler_bench.report import TO_ZERO, plot, write_markdown
from sdjax import schedules
from sdjax.errors import InvalidArgumentError
from sdjax.samplers import SAMPLERS

HERE = pathlib.Path(__file__).parent


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


def path_errors(x, reference) -> np.ndarray:
    """Euclidean distance of each path's endpoint to its reference endpoint, (n,)."""
    return np.linalg.norm(np.asarray(x) - reference, axis=-1)


def rms_error(x, reference) -> float:
    """Root mean square over paths of the Euclidean distance to the reference endpoint."""
    return float(np.sqrt(np.mean(path_errors(x, reference) ** 2)))


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


# -------------------------------------------------------------------------------------- measurements

def classify_samplers(mixture, table):
    """Split SAMPLERS into deterministic fixed-step, adaptive (nfe is None) and stochastic ones, and those that
    refuse a plain sigma grid with default options (name -> the sampler's message), which are reported, not run."""
    x = jnp.asarray(mixture.sample(np.random.default_rng(0), 4, table[-1]))
    sigmas = schedules.karras(4, table[0], table[-1])
    deterministic, adaptive, stochastic, refused = [], [], [], {}
    for name in sorted(SAMPLERS):
        try:
            deterministic_here = is_deterministic(compiled_sampler(name, make_denoiser(mixture)), x, sigmas)
        except InvalidArgumentError as error:
            refused[name] = str(error)
            continue
        if not deterministic_here:
            stochastic.append(name)
        elif SAMPLERS[name].nfe is None:
            adaptive.append(name)
        else:
            deterministic.append(name)
    return deterministic, adaptive, stochastic, refused


def deterministic_specs(config, mixture, table, names):
    """Rows of the deterministic tables: every deterministic sampler with default options, then the configured
    variants (deterministic settings of samplers that are stochastic by default), each checked deterministic."""
    specs = [{"label": name, "sampler": name, "options": {}, "equals": None} for name in names]
    x = jnp.asarray(mixture.sample(np.random.default_rng(0), 4, table[-1]))
    sigmas = schedules.karras(4, table[0], table[-1])
    for label, variant in config["variants"].items():
        spec = {"label": label, "sampler": variant["sampler"], "options": variant.get("options", {}),
                "equals": variant.get("equals")}
        if not is_deterministic(compiled_sampler(spec["sampler"], make_denoiser(mixture), **spec["options"]),
                                x, sigmas):
            raise ValueError(f"variant {label!r} depends on the PRNG key")
        if spec["equals"] is not None and spec["equals"] not in names:
            raise ValueError(f"variant {label!r} must equal {spec['equals']!r}, which is not a deterministic row")
        specs.append(spec)
    return specs


def run_deterministic(config, mixture, table, specs, x_start, reference):
    """Per (row, schedule, steps): the ODE error on the grid without its final 0 (the solver's order), and for
    karras also the sample error on the whole grid, whose last jump sigma_min -> 0 is a single step. Each cell
    keeps the RMS and the median of the per-path errors, the number of paths that end in another mixture
    component than the exact flow ("flips") and the RMS over the paths that do not. Returns (rows, karras ODE
    outputs by (label, steps)); rows include each row's wall time and, for variants that must reproduce
    another row, the largest difference from it over all grids."""
    key = jax.random.key(0)
    must_match = {spec["equals"] for spec in specs if spec["equals"]}
    outputs, rows = {}, []
    for spec in specs:
        label, options = spec["label"], spec["options"]
        run = counted_sampler(spec["sampler"], mixture, **options)
        difference = 0.0
        for schedule in config["schedules"]:
            for steps in karras_steps(config) if schedule == "karras" else config["steps"]:
                sigmas = schedules.get_schedule(schedule)(steps, table)
                targets = [(schedule, sigmas[:-1])]
                if schedule == "karras" and steps in config["steps"]:
                    targets.append((TO_ZERO, sigmas))
                for grid_label, grid in targets:
                    output, nfe = run(x_start, grid, key)
                    sigma_end = float(grid[-1])
                    exact = reference(float(grid[0]), sigma_end)
                    errors = path_errors(output, exact)
                    flipped = mixture.component(output, sigma_end) != mixture.component(exact, sigma_end)
                    rows.append({"sampler": label, "schedule": grid_label, "steps": steps, "nfe": nfe,
                                 "error": float(np.sqrt(np.mean(errors**2))), "median": float(np.median(errors)),
                                 "flips": int(flipped.sum()),
                                 "error_rest": float(np.sqrt(np.mean(errors[~flipped] ** 2)))})
                    if label in must_match or grid_label == "karras":
                        outputs[label, grid_label, steps] = output
                    if spec["equals"]:
                        other = outputs[spec["equals"], grid_label, steps]
                        difference = max(difference, float(np.max(np.abs(output - other))))
        timing_grid = schedules.karras(config["timing_steps"], table[0], table[-1])
        seconds = wall_time(compiled_sampler(spec["sampler"], make_denoiser(mixture), **options), x_start,
                            timing_grid, key, config["timing_repeats"])
        rows.append({"sampler": label, "schedule": "timing", "steps": config["timing_steps"], "seconds": seconds})
        if spec["equals"]:
            rows.append({"sampler": label, "schedule": "equals", "equals": spec["equals"], "difference": difference})
        print(f"  {label}", flush=True)
    karras = {(label, steps): out for (label, grid_label, steps), out in outputs.items() if grid_label == "karras"}
    return rows, karras


# ------------------------------------------------------------------ reimplementations: what limits the order

def lms_numpy(mixture, x, sigmas, order=4, exact=None):
    """k-diffusion's `sample_lms` (variable-step Adams-Bashforth in sigma on the slope (x - D) / sigma) in
    numpy, on a grid ending above 0. Its first order - 1 steps are of orders 1, 2, ... as the history fills up;
    with `exact(sigma)` the exact flow replaces the states they produce."""
    slopes = []  # newest first
    for i in range(len(sigmas) - 1):
        slopes.insert(0, (x - mixture.denoise(np, x, float(sigmas[i]))) / sigmas[i])
        step = sigmas[i + 1] - sigmas[i]
        nodes = (sigmas[i - np.arange(min(i + 1, order))] - sigmas[i]) / step  # in units of this step
        x_next = x
        for j, node in enumerate(nodes):
            others = np.delete(nodes, j)
            basis = polynomial.polyint(polynomial.polyfromroots(others) / np.prod(node - others))
            x_next = x_next + step * (polynomial.polyval(1.0, basis) - polynomial.polyval(0.0, basis)) * slopes[j]
        x = exact(float(sigmas[i + 1])) if exact is not None and i < order - 1 else x_next
    return x


def dpmpp_3m_numpy(mixture, x, sigmas, d2_weight=1.0, exact=None):
    """DPM-Solver++(3M) with eta = 0 in numpy, on a grid ending above 0: k-diffusion's `sample_dpmpp_3m_sde`
    update (also diffusers' and the DPM-Solver reference's third-order multistep update) with its second
    divided-difference term multiplied by d2_weight (1: their formula). With `exact(sigma)`, the exact flow
    replaces the states of the two warm-up steps (orders 1 and 2)."""
    lam = -np.log(np.asarray(sigmas, np.float64))
    denoised = []  # newest first
    for i in range(len(lam) - 1):
        h = lam[i + 1] - lam[i]
        denoised.insert(0, mixture.denoise(np, x, float(sigmas[i])))
        phi_2 = np.expm1(-h) / h + 1          # (e^-h - 1 + h) / h
        phi_3 = phi_2 / h - 0.5
        x_next = np.exp(-h) * x - np.expm1(-h) * denoised[0]
        if i >= 2:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            d1_0, d1_1 = (denoised[0] - denoised[1]) / r0, (denoised[1] - denoised[2]) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)   # ~ h^2 D''/2, where the third-order term needs h^2 D''
            x_next = x_next + phi_2 * d1 - d2_weight * phi_3 * d2
        elif i == 1:
            x_next = x_next + phi_2 * (denoised[0] - denoised[1]) / ((lam[1] - lam[0]) / h)
        x = exact(float(sigmas[i + 1])) if exact is not None and i < 2 else x_next
    return x


def run_reimplementations(config, mixture, table, x_start, reference, karras_outputs):
    """The karras ODE error of each configured reimplementation, and for those that must reproduce a row, the
    largest difference from that row's outputs."""
    rows, differences = [], {}
    for label, spec in config["reimplementations"].items():
        for steps in karras_steps(config):
            grid = np.asarray(schedules.karras(steps, table[0], table[-1]))[:-1]
            exact = (lambda sigma, start=float(grid[0]): reference(start, sigma)) if spec.get("exact_warmup") \
                else None
            if spec["method"] == "lms":
                output = lms_numpy(mixture, np.asarray(x_start), grid, exact=exact)
            else:
                output = dpmpp_3m_numpy(mixture, np.asarray(x_start), grid, spec.get("d2_weight", 1.0), exact)
            rows.append({"sampler": label, "schedule": "karras", "steps": steps, "nfe": steps - 1,
                         "error": rms_error(output, reference(float(grid[0]), float(grid[-1])))})
            matched = karras_outputs.get((spec.get("matches"), steps))
            if matched is not None:
                differences[label] = max(differences.get(label, 0.0), float(np.max(np.abs(output - matched))))
    return rows, differences


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


# ----------------------------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
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

        deterministic_names, adaptive_names, stochastic_names, refused = classify_samplers(mixture, table)
        specs = deterministic_specs(config, mixture, table, deterministic_names)
        print(f"deterministic: {[spec['label'] for spec in specs]}\nadaptive: {adaptive_names}\n"
              f"stochastic: {stochastic_names}\nnot run: {sorted(refused)}")
        x_start = jnp.asarray(start_points)
        deterministic, karras_outputs = run_deterministic(config, mixture, table, specs, x_start, reference)
        reimplemented, differences = run_reimplementations(config, mixture, table, x_start, reference,
                                                           karras_outputs)
        adaptive = run_adaptive(config, mixture, table, adaptive_names, x_start, reference)
        stochastic, floor = run_stochastic(config, mixture, table, stochastic_names, config["seed"])

    args.out.mkdir(parents=True, exist_ok=True)
    write_markdown(args.out / "results.md", config, table, deterministic, reimplemented, differences, adaptive,
                   stochastic, floor, refused, time.perf_counter() - began, quick=args.quick)
    plot(args.out / "error_vs_nfe.png", config, deterministic, stochastic, floor)
    print(f"wrote {args.out / 'results.md'} and {args.out / 'error_vs_nfe.png'}")


if __name__ == "__main__":
    main()
