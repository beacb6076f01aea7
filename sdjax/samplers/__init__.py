"""The sampler zoo: `SAMPLERS[name](denoise, x, sigmas, key, **options) -> x` (see docs/samplers.md).

Every sampler is a pure function whose loop over steps is one `lax.scan` (adaptive ones: `lax.while_loop`).
Importing the sampler modules below is what fills the registry: each registers itself with `@register`.
"""
from sdjax.samplers.registry import SAMPLERS, get_sampler
from sdjax.samplers import diffusers_solvers, multistep, singlestep, unipc  # noqa: F401  (they register)

__all__ = ["SAMPLERS", "get_sampler"]
