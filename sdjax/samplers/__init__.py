"""The sampler zoo: `SAMPLERS[name](denoise, x, sigmas, key, **options) -> x`.

Every sampler is a pure function whose loop over steps is one `lax.scan` (adaptive ones: `lax.while_loop`).
"""
from sdjax.samplers.registry import SAMPLERS, get_sampler

__all__ = ["SAMPLERS", "get_sampler"]
