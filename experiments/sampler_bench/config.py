"""Configuration of the sampler benchmark: `get_config()` for the full run, `get_config(quick=True)` for a smoke run."""
from __future__ import annotations


def get_config(quick: bool = False) -> dict:
    config = {
        "seed": 0,
        # 8-D, 4 well separated components of unequal, anisotropic widths: curved ODE paths.
        "mixture": {"components": 4, "dim": 8, "mean_scale": 1.5, "std_range": [0.15, 0.8]},
        # Stable Diffusion's discrete schedule: the sigma range and the table the discrete schedules read.
        "model_schedule": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                           "num_train_timesteps": 1000},
        "schedules": ["karras", "exponential", "normal", "simple", "sgm_uniform", "ddim_uniform", "beta"],
        "steps": [4, 8, 16, 32, 64, 128, 256],
        "order_fit_min_steps": 32,     # fit the order on the asymptotic end of the curve
        "error_floor": 1e-10,          # points below this are float64 / reference round-off, not discretisation
        "samples": 512,                # paths for the deterministic error
        "reference_tolerance": 1e-12,  # DOP853 rtol = atol of the reference solve
        "adaptive_rtols": [0.05, 0.01, 0.002, 0.0005],
        "stochastic_steps": [8, 16, 32, 64],
        "stochastic_samples": 20000,   # moment errors: Monte-Carlo noise ~ 1 / sqrt(this)
        "timing_steps": 32,
        "timing_repeats": 5,
        "dtype": "float64",
    }
    if quick:
        config.update(schedules=["karras", "normal"], steps=[4, 8, 16], order_fit_min_steps=8, samples=64,
                      adaptive_rtols=[0.05], stochastic_steps=[8], stochastic_samples=2000, timing_steps=8,
                      timing_repeats=2)
    return config
