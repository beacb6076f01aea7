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
        # karras only (a continuous schedule; the discrete ones run out of the 1000-entry table): the ODE error
        # further out, for the asymptotic order.
        "karras_extra_steps": [512, 1024],
        "order_fit_steps": [32, 256],         # the order's fit window, every schedule: the practical range
        "asymptotic_fit_steps": [128, 1024],  # karras only: the asymptotic order
        "error_floor": 1e-10,          # points below this are float64 / reference round-off, not discretisation
        "samples": 512,                # paths for the deterministic error
        "reference_tolerance": 1e-12,  # DOP853 rtol = atol of the reference solve
        # More rows: deterministic settings of samplers that are stochastic by default, and other options worth
        # a row. Row label -> sampler, options and (optional) the row it must reproduce exactly, checked on
        # every grid.
        "variants": {
            "euler_ancestral(eta=0)": {"sampler": "euler_ancestral", "options": {"eta": 0.0}, "equals": "euler"},
            "dpm_2_ancestral(eta=0)": {"sampler": "dpm_2_ancestral", "options": {"eta": 0.0}, "equals": "dpm_2"},
            "dpmpp_2s_ancestral(eta=0)": {"sampler": "dpmpp_2s_ancestral", "options": {"eta": 0.0}},
            "dpmpp_sde(eta=0)": {"sampler": "dpmpp_sde", "options": {"eta": 0.0}},
            "dpmpp_2m_sde(eta=0)": {"sampler": "dpmpp_2m_sde", "options": {"eta": 0.0}, "equals": "dpmpp_2m"},
            "dpmpp_3m_sde(eta=0)": {"sampler": "dpmpp_3m_sde", "options": {"eta": 0.0}},
            # the full Taylor weight on the second divided difference (the references use half of it)
            "dpmpp_3m_sde(eta=0, taylor)": {"sampler": "dpmpp_3m_sde",
                                            "options": {"eta": 0.0, "taylor_third_order": True}},
            # unipc's default makes its last step first order (and, on a grid ending above 0, uncorrected).
            "unipc(lower_order_final=False)": {"sampler": "unipc", "options": {"lower_order_final": False}},
        },
        # numpy reimplementations on the karras ODE grids, to explain the asymptotic orders of the multistep
        # samplers: with the exact flow in place of the lower-order warm-up steps ("exact_warmup"), and for
        # DPM-Solver++(3M) with its second-divided-difference term scaled by d2_weight (1: the published
        # formula). "matches": the row a plain reimplementation must reproduce to round-off.
        "reimplementations": {
            "lms": {"method": "lms", "matches": "lms"},
            "lms, exact warm-up": {"method": "lms", "exact_warmup": True},
            "3m, D2 weight 1": {"method": "dpmpp_3m", "d2_weight": 1.0, "matches": "dpmpp_3m_sde(eta=0)"},
            "3m, D2 weight 1, exact warm-up": {"method": "dpmpp_3m", "d2_weight": 1.0, "exact_warmup": True},
            "3m, D2 weight 2": {"method": "dpmpp_3m", "d2_weight": 2.0},
            "3m, D2 weight 2, exact warm-up": {"method": "dpmpp_3m", "d2_weight": 2.0, "exact_warmup": True},
        },
        "adaptive_rtols": [0.05, 0.01, 0.002, 0.0005],
        "stochastic_steps": [8, 16, 32, 64],
        "stochastic_samples": 20000,   # moment errors: Monte-Carlo noise ~ 1 / sqrt(this)
        "by_schedule_steps": 32,       # the step count of the error-by-schedule table
        "timing_steps": 32,
        "timing_repeats": 5,
        "dtype": "float64",
    }
    if quick:
        config.update(schedules=["karras", "normal"], steps=[4, 8, 16], karras_extra_steps=[32],
                      order_fit_steps=[8, 16], asymptotic_fit_steps=[8, 32], samples=64, adaptive_rtols=[0.05],
                      stochastic_steps=[8], stochastic_samples=2000, by_schedule_steps=8, timing_steps=8,
                      timing_repeats=2)
    return config


def karras_steps(config) -> list[int]:
    """The step counts run on the karras grid: the common ones and the extra ones of the asymptotic fit."""
    return config["steps"] + config["karras_extra_steps"]
