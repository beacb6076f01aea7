"""The sampler benchmark's report: convergence orders fitted to the measured curves, results.md (tables and the
measured account of each finding) and error_vs_nfe.png."""
from __future__ import annotations

import json
import math

import jax
import numpy as np

from experiments.sampler_bench.config import karras_steps
from sdjax.train.loop import git_revision

TO_ZERO = "karras, to sigma=0"  # the whole grid including the final jump sigma_min -> 0

def fit_order(points, window, floor, key="error") -> float:
    """Convergence order p in error ~ NFE^-p: least-squares slope of log points[key] against log NFE over the
    points with window[0] <= steps <= window[1] and error above the round-off floor."""
    kept = [(p["nfe"], p[key]) for p in points if window[0] <= p["steps"] <= window[1] and p[key] > floor]
    if len(kept) < 2:
        return math.nan
    log_nfe, log_error = np.log(np.array(kept, np.float64)).T
    return float(-np.polyfit(log_nfe, log_error, 1)[0])


def local_orders(points, key="error") -> list[float]:
    """The slope -d log error / d log NFE between consecutive points: where the asymptotic regime begins."""
    return [float(-np.log(b[key] / a[key]) / np.log(b["nfe"] / a["nfe"])) if a[key] > 0 and b[key] > 0 else math.nan
            for a, b in zip(points, points[1:])]

def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _curves(rows, sampler, schedule):
    return [r for r in rows if r["sampler"] == sampler and r["schedule"] == schedule]


def _error_cells(curve, key="error"):
    return [f"{r[key]:.2e} ({r['nfe']})" for r in curve]


def _flip_cell(r):
    return f"{r['flips']} ({r['error_rest']:.1e})" if r["flips"] else "0"


def _window(window) -> str:
    return f"{window[0]}-{window[1]}"


def _orders_text(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


class _Fits:
    """Fitted orders of the deterministic rows (and of the reimplementations) over the configured windows."""

    def __init__(self, config, rows):
        self.config, self.rows = config, rows

    def practical(self, name, schedule="karras", key="error"):
        return fit_order(_curves(self.rows, name, schedule), self.config["order_fit_steps"],
                         self.config["error_floor"], key)

    def asymptotic(self, name, key="error"):
        return fit_order(_curves(self.rows, name, "karras"), self.config["asymptotic_fit_steps"],
                         self.config["error_floor"], key)


def _refused_text(refused):
    if not refused:
        return ""
    return "Not run, because they refuse a plain sigma grid with default options: " + "; ".join(
        f"`{name}` ({message})" for name, message in sorted(refused.items())) + "."


def _euler_text(config, deterministic, fits):
    """The measured account of euler's RMS curve on karras, from the numbers in the tables."""
    curve = _curves(deterministic, "euler", "karras")
    if not curve:
        return "euler did not run."
    flipped = [r for r in curve if r["flips"]]
    if not flipped:
        return "No euler path on karras ends in another mixture component than the exact flow in this run."
    cells = "; ".join(f"{r['steps']} steps: {r['flips']} of {config['samples']} paths, RMS {r['error']:.2e}, "
                      f"RMS of the other paths {r['error_rest']:.2e}, median {r['median']:.2e}" for r in flipped)
    clean = [r for r in curve if r["steps"] > flipped[-1]["steps"]]
    after = (f"From {clean[0]['steps']} steps on no path flips, and the RMS, too, halves with every doubling of "
             f"the steps (local orders {_orders_text(local_orders(clean))}); between {flipped[-1]['steps']} and "
             f"{clean[0]['steps']} steps, as the last flip goes, it falls by a factor "
             f"{flipped[-1]['error'] / clean[0]['error']:.1f}." if clean else
             "Paths still flip at the largest step count.")
    window, asymptotic = config["order_fit_steps"], config["asymptotic_fit_steps"]
    return (f"euler (and ddim and euler_ancestral(eta=0), which are euler) sends a few paths to another mixture "
            f"component than the exact flow ({cells}). Such a path misses by about the distance between two "
            f"components, so one path of {config['samples']} can dominate the RMS, while the median follows the "
            f"first-order rate throughout (its local orders: {_orders_text(local_orders(curve, 'median'))}). The "
            f"effect is real, and it stays in the RMS table: a path that starts near the boundary between two "
            f"components' basins of the flow can be pushed across it by the first-order step error at large "
            f"sigma. It is pre-asymptotic. {after} So over {_window(window)} steps euler's RMS order is "
            f"{fits.practical('euler'):.2f} (median {fits.practical('euler', key='median'):.2f}): the flipped paths "
            f"at the low end of that window tilt the slope; over "
            f"{_window(asymptotic)} steps it is {fits.asymptotic('euler'):.2f} (median "
            f"{fits.asymptotic('euler', 'median'):.2f}).")


def _reimplementation_summary(config, reimplemented, label):
    points = _curves(reimplemented, label, "karras")
    return (f"{label}: {fit_order(points, config['asymptotic_fit_steps'], config['error_floor']):.2f} "
            f"(last local orders {_orders_text(local_orders(points)[-3:])})")


def _warmup_text(config, deterministic, reimplemented, differences, fits):
    if not _curves(deterministic, "lms", "karras") or not _curves(reimplemented, "lms", "karras"):
        return "lms did not run."
    checks = "; ".join(_reimplementation_summary(config, reimplemented, label) for label in config["reimplementations"]
                       if label.startswith("lms"))
    return (f"A multistep method has no history at its first step, so it starts with lower orders: lms (order 4) "
            f"takes steps of order 1, 2, 3 first; dpmpp_2m, deis, dpmpp_3m_sde and ipndm take an order-1 first "
            f"step. The first step's local error is O(h^2) and is not repeated, so "
            f"it leaves an O(h^2) global error, damped by the flow from sigma_max down but not vanishing faster. "
            f"A higher-order method's error is then its design-order term plus this h^2 term, and the h^2 term "
            f"wins at large step counts: lms fits {fits.practical('lms'):.2f} over {_window(config['order_fit_steps'])}"
            f" steps but {fits.asymptotic('lms'):.2f} over {_window(config['asymptotic_fit_steps'])} (local orders "
            f"{_orders_text(local_orders(_curves(deterministic, 'lms', 'karras'))[-4:])} over the last step counts), "
            f"and plms / pndm / ipndm reach 2 (pndm and plms start with a Heun step, but their fixed Adams-Bashforth "
            f"weights assume equal steps, which a karras grid does not have; ipndm's docstring says it is second "
            f"order on such grids). {_unipc_text(deterministic, fits)} The "
            f"numpy reimplementation of lms below reproduces sdjax's to {differences.get('lms', math.nan):.1e}; "
            f"with the exact flow in place of its three warm-up steps it is fourth order ({checks}). The cap is "
            f"a property of the methods as published (k-diffusion's lms starts the same way), not of sdjax.")


def _unipc_text(deterministic, fits):
    variant = "unipc(lower_order_final=False)"
    if not _curves(deterministic, "unipc", "karras") or not _curves(deterministic, variant, "karras"):
        return ""
    return (f"unipc, whose corrector raises every step's order by one (the first step's included), fits "
            f"{fits.asymptotic('unipc'):.2f}, but its median {fits.asymptotic('unipc', 'median'):.2f}: with its "
            f"default lower_order_final the last step is first order and, on a grid that ends above 0, "
            f"uncorrected, and the O(h^2) error of that step is not damped by any later flow. The median shows "
            f"it first; the RMS, set by the paths with the largest third-order errors, bends only at larger step "
            f"counts. {variant} fits {fits.asymptotic(variant):.2f} (median "
            f"{fits.asymptotic(variant, 'median'):.2f}).")


def _dpmpp_3m_text(config, deterministic, reimplemented, differences, fits):
    label = "dpmpp_3m_sde(eta=0)"
    if not _curves(deterministic, label, "karras"):
        return "dpmpp_3m_sde(eta=0) did not run."
    checks = "; ".join(_reimplementation_summary(config, reimplemented, name) for name in config["reimplementations"]
                       if name.startswith("3m"))
    return (f"DPM-Solver++(3M), dpmpp_3m_sde(eta=0), fits {fits.practical(label):.2f} over "
            f"{_window(config['order_fit_steps'])} steps and {fits.asymptotic(label):.2f} over "
            f"{_window(config['asymptotic_fit_steps'])} (median {fits.asymptotic(label, 'median'):.2f}): second "
            f"order even before the warm-up cap. The cause is its update formula, which sdjax takes from "
            f"k-diffusion's `sample_dpmpp_3m_sde` (diffusers' and the DPM-Solver reference's third-order "
            f"multistep update are the same): x' = e^-h x + (1 - e^-h) D0 + phi_2 d1 - phi_3 d2, phi_2 = "
            f"(e^-h - 1 + h) / h, phi_3 = phi_2 / h - 1/2 ~ -h/6. Its d2, the second divided difference of D in "
            f"units of h, tends to h^2 D''/2, while the D'' term of the exact solution, the integral of "
            f"e^-(h-t) t^2/2 D'' dt over [0, h] ~ h^3 D''/6, needs -phi_3 times h^2 D''. The term is half the "
            f"third-order one, which leaves a local error ~ h^3 D''/12 per step and a global error of order 2. "
            f"The numpy reimplementation below reproduces sdjax's dpmpp_3m_sde(eta=0) to "
            f"{differences.get('3m, D2 weight 1', math.nan):.1e} with D2 weight 1. Asymptotic orders ({checks}): "
            f"the published formula stays second order even with an exact warm-up; with the doubled weight it is "
            f"third order until the warm-up's h^2 term appears, and third order throughout with an exact warm-up. "
            f"sdjax keeps k-diffusion's formula by default (its samplers are checked against k-diffusion and "
            f"diffusers); its order is a property of that formula, measured here, not something a fit window "
            f"creates. `dpmpp_3m_sde(taylor_third_order=True)` uses the full weight: the row "
            f"dpmpp_3m_sde(eta=0, taylor) fits {fits.practical('dpmpp_3m_sde(eta=0, taylor)'):.2f} over "
            f"{_window(config['order_fit_steps'])} steps.")


def write_markdown(path, config, table, deterministic, reimplemented, differences, adaptive, stochastic, floor,
                   refused, elapsed, quick=False):
    labels = list(dict.fromkeys(r["sampler"] for r in deterministic))
    fits = _Fits(config, deterministic)
    window, asymptotic = _window(config["order_fit_steps"]), _window(config["asymptotic_fit_steps"])
    seconds = {r["sampler"]: r["seconds"] for r in deterministic if r["schedule"] == "timing"}
    steps_header = [f"{s} steps" for s in config["steps"]]
    karras_header = [f"{s} steps" for s in karras_steps(config)]
    by_order = sorted(labels, key=lambda name: -np.nan_to_num(fits.practical(name)))
    ode_rows = [[name, f"{fits.practical(name):.2f}", f"{fits.practical(name, key='median'):.2f}",
                 f"{fits.asymptotic(name):.2f}", f"{fits.asymptotic(name, 'median'):.2f}"]
                + _error_cells(_curves(deterministic, name, "karras")) + [f"{1e3 * seconds[name]:.2f}"]
                for name in by_order]
    median_rows = [[name] + _error_cells(_curves(deterministic, name, "karras"), "median") for name in by_order]
    flip_rows = [[name] + [_flip_cell(r) for r in _curves(deterministic, name, "karras")] for name in by_order
                 if any(r["flips"] for r in _curves(deterministic, name, "karras"))]
    last_flip_rows = [[name] + [str(max([r["steps"] for r in _curves(deterministic, name, s) if r["flips"]],
                                        default="-")) for s in config["schedules"]] for name in by_order]
    local_header = [f"{a}->{b}" for a, b in zip(karras_steps(config), karras_steps(config)[1:])]
    local_rows = [[name] + [f"{p:.2f}" for p in local_orders(_curves(deterministic, name, "karras"))]
                  for name in by_order]
    sample_rows = [[name, f"{fits.practical(name, TO_ZERO):.2f}"] + _error_cells(_curves(deterministic, name, TO_ZERO))
                   for name in by_order]
    order_rows = [[name] + [f"{fits.practical(name, s):.2f} / {fits.practical(name, s, 'median'):.2f}"
                            for s in config["schedules"]] for name in by_order]
    middle = config["by_schedule_steps"]
    middle_rows = [[name] + [f"{r['error']:.1e}" for s in config["schedules"] for r in _curves(deterministic, name, s)
                             if r["steps"] == middle] for name in by_order]
    equal_rows = [[r["sampler"], r["equals"], f"{r['difference']:.1e}"] for r in deterministic
                  if r["schedule"] == "equals"]
    reimplementation_rows = []
    for label, spec in config["reimplementations"].items():
        points = _curves(reimplemented, label, "karras")
        matches = f"{spec['matches']} ({differences[label]:.1e})" if label in differences else "-"
        reimplementation_rows.append(
            [label, matches, f"{fit_order(points, config['order_fit_steps'], config['error_floor']):.2f}",
             f"{fit_order(points, config['asymptotic_fit_steps'], config['error_floor']):.2f}"]
            + [f"{r['error']:.2e}" for r in points])
    adaptive_rows = [[r["sampler"], r["rtol"], r["nfe"], f"{r['error']:.2e}"] for r in adaptive]
    stochastic_rows = [[r["sampler"], r["steps"], r["nfe"], f"{r['mean_error']:.4f}", f"{r['cov_error']:.4f}"]
                       for r in stochastic]
    stochastic_rows.append(["exact data samples (Monte-Carlo floor)", "-", "-", f"{floor['mean_error']:.4f}",
                            f"{floor['cov_error']:.4f}"])
    quick_note = ("\n**Smoke run (--quick)**: too few paths and step counts; the explanations below describe the "
                  "full run and need not fit these numbers.\n" if quick else "")
    text = f"""# Sampler benchmark: analytic Gaussian mixture

Regenerate: `python -m experiments.sampler_bench.run` (see README.md). Plot: `error_vs_nfe.png`.
{quick_note}
**Problem.** A {config['mixture']['components']}-component Gaussian mixture in {config['mixture']['dim']}-D with
diagonal covariances; every sampler gets its exact denoiser E[x0 | x], so all error is the sampler's own.
Noise range and discrete tables are Stable Diffusion's ({config['model_schedule']['beta_schedule']}, sigma
{table[0]:.4f} to {table[-1]:.4f}). Arithmetic float64; {config['samples']} paths from exact samples of the noised
marginal at sigma_max.

**Rows.** Every deterministic sampler with its default options, and configured settings (`variants` in
config.py), labelled like `dpmpp_3m_sde(eta=0)`: the deterministic settings of samplers that are stochastic by
default, and unipc without its lower-order final step. A variant that must reproduce another row
(euler_ancestral(eta=0) is euler) is checked on every grid (table "Variants that must reproduce another row").
{_refused_text(refused)}

**Error.** Per path, |x_sampler - x_exact|, x_exact from a DOP853 solve of the probability-flow ODE
(rtol = atol = {config['reference_tolerance']:g}) over the same sigma interval; tables give the RMS over paths
unless they say *median*. *ODE error*: the grid without its final 0, so the sampler integrates the ODE from
sigma_max to the grid's last positive sigma; this is what the convergence order measures. *Sample error*: the
whole grid down to sigma = 0, whose last jump sigma_min -> 0 is a single step for most samplers and sets an error
floor that no step count removes. **Flips**: paths whose endpoint's most probable mixture component differs from
the exact endpoint's. **NFE** is counted at run time. Cells: error (NFE).

**Order.** Least-squares slope of log error against log NFE (points with error > {config['error_floor']:g}),
for the RMS and for the median, over two windows: *{window} steps*, the practical range, on every schedule; and on
karras, which also runs {', '.join(map(str, config['karras_extra_steps']))} steps, *{asymptotic} steps*, the
asymptotic order. (The discrete schedules are not run past {config['steps'][-1]} steps: they pick from the
{config['model_schedule']['num_train_timesteps']}-entry timestep table, which such grids exhaust.) The two windows
differ for two reasons, both measured below: euler's flipped paths at the low end of the practical window, and the
warm-up of the multistep methods at the high end of the asymptotic one.

### Why the median and the flips: euler's kink

The RMS is the headline number, but on a multi-modal target it can be set by a handful of paths.
{_euler_text(config, deterministic, fits)} The median shows the typical path's discretisation error; the flips
tables show how many paths reach another mode, and up to which step count; the local-order table shows where each
curve reaches its asymptotic slope.

### Why the multistep methods end at order 2

{_warmup_text(config, deterministic, reimplemented, differences, fits)}

### Why dpmpp_3m_sde(eta=0) is not third order

{_dpmpp_3m_text(config, deterministic, reimplemented, differences, fits)}

## ODE error on the karras schedule (RMS, sorted by the {window} order)

{_table(["sampler", f"order {window}", "median", f"order {asymptotic}", "median"] + karras_header + [f"ms/call ({config['timing_steps']} steps, to 0)"], ode_rows)}

## Median per-path ODE error on the karras schedule

{_table(["sampler"] + karras_header, median_rows)}

## Paths ending in another mixture component (karras ODE, of {config['samples']})

Cells: flipped paths (RMS ODE error of the other paths); rows without any flip on karras are left out.

{_table(["sampler"] + karras_header, flip_rows) if flip_rows else "No flips on karras."}

## Largest step count with a flipped path, by schedule (ODE; - = none)

{_table(["sampler"] + config["schedules"], last_flip_rows)}

## Local order of the RMS ODE error on karras (slope between consecutive step counts)

{_table(["sampler"] + local_header, local_rows)}

## Sample error on the karras schedule, down to sigma = 0

{_table(["sampler", f"order {window}"] + steps_header, sample_rows)}

## Fitted order of the ODE error by schedule, {window} steps (RMS / median)

{_table(["sampler"] + config["schedules"], order_rows)}

## ODE error at {middle} steps by schedule

{_table(["sampler"] + config["schedules"], middle_rows)}

## Variants that must reproduce another row

Largest |difference| of the outputs over every grid of every schedule (ODE and, on karras, down to 0).

{_table(["variant", "must equal", "max |difference|"], equal_rows)}

## Reimplementations: warm-up and the DPM-Solver++(3M) formula (karras ODE error, RMS)

numpy reimplementations (`lms_numpy`, `dpmpp_3m_numpy` in run.py). *exact warm-up*: the exact flow replaces the
states of the lower-order warm-up steps (lms: 3, 3m: 2). *D2 weight*: the factor on DPM-Solver++(3M)'s
second-divided-difference term (1: the published formula, 2: the third-order one). "reproduces": the row a plain
reimplementation must match, with the largest |difference| over the grids. NFE = steps - 1.

{_table(["reimplementation", "reproduces", f"order {window}", f"order {asymptotic}"] + karras_header, reimplementation_rows)}

## Adaptive samplers: sample error over a tolerance sweep

{_table(["sampler", "rtol", "NFE", "sample error"], adaptive_rows)}

## Stochastic samplers: moment errors on karras, down to sigma = 0 ({config['stochastic_samples']} samples)

Default options (their eta = 0 settings are rows of the deterministic tables). Mean error |mean - exact|;
covariance error ||cov - exact||_F / ||exact||_F. The last row is the Monte-Carlo noise of as many exact data
samples: values near it mean the bias is below what this sample size resolves.

{_table(["sampler", "steps", "NFE", "mean error", "cov error"], stochastic_rows)}

## Run

git revision {git_revision()}; seed {config['seed']}; {jax.devices()[0].platform} backend; {elapsed:.0f} s wall
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

    panels = config["schedules"] + [TO_ZERO, "karras, median", "stochastic"]
    columns = 3
    grid_rows = math.ceil((len(panels) + 1) / columns)  # at least one more cell, for the shared legend
    figure, axes = plt.subplots(grid_rows, columns, figsize=(5.2 * columns, 3.9 * grid_rows), squeeze=False)
    labels = list(dict.fromkeys(r["sampler"] for r in deterministic))
    variants = set(config["variants"])
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(labels), 2)))
    handles = []
    for ax, panel in zip(axes.flat, panels):
        if panel == "stochastic":
            for color, name in zip(plt.get_cmap("tab10").colors, sorted({r["sampler"] for r in stochastic})):
                curve = [r for r in stochastic if r["sampler"] == name]
                ax.loglog([r["nfe"] for r in curve], [r["cov_error"] for r in curve], "o-", color=color, label=name)
            ax.axhline(floor["cov_error"], color="black", linestyle=":", label="Monte-Carlo floor")
            ax.set_title("stochastic (default options), karras: cov. rel. error", fontsize=10)
            ax.legend(fontsize=6, ncol=2)
        else:
            schedule, key = ("karras", "median") if panel == "karras, median" else (panel, "error")
            handles = []
            for i, (color, name) in enumerate(zip(colors, labels)):
                curve = _curves(deterministic, name, schedule)
                # Variants dotted with crosses, so one that retraces another row stays visible.
                style = dict(linestyle=":", marker="x", ms=5) if name in variants else dict(
                    linestyle=["-", "--"][i % 2], marker="os^vD"[i % 5], ms=3)
                handles += ax.loglog([r["nfe"] for r in curve], [r[key] for r in curve], color=color, label=name,
                                     **style)
            kind = "sample" if panel == TO_ZERO else "ODE"
            ax.set_title(f"{schedule}: {'median' if key == 'median' else 'RMS'} {kind} error", fontsize=10)
        ax.set_xlabel("NFE")
        ax.grid(True, which="both", alpha=0.3)
    legend_axes = list(axes.flat)[len(panels):]
    for ax in legend_axes:
        ax.axis("off")
    legend_axes[0].legend(handles=handles, loc="center", fontsize=8, ncol=2, title="deterministic rows")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
