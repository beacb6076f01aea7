"""The sampler registry: `@register(name, nfe=...)` files a sampler under its name, checked on every call.

Two tables. `SAMPLERS` is the public zoo: the names `sdjax generate --sampler` and
`Pipeline.generate(sampler=...)` accept. `INTERNAL_SAMPLERS` holds samplers that exist only to reproduce a
diffusers scheduler exactly (`register(..., internal=True)`); only the plans of `sdjax.scheduler_config` name
them, so they stay out of the zoo's listing and its error messages.

Sampler modules import `register` from here and this module imports none of them (no import cycle);
`sdjax/samplers/__init__.py` imports every sampler module, so importing `sdjax.samplers` fills both tables.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

from sdjax.errors import InvalidArgumentError, did_you_mean
from sdjax.samplers.common import check_sigmas

SAMPLERS: dict[str, Callable] = {}
INTERNAL_SAMPLERS: dict[str, Callable] = {}


def one_per_step(steps: int) -> int:
    """The NFE of most samplers: one denoiser evaluation per step."""
    return steps


def _checked(fn, nfe):
    """`fn` behind the checks every sampler gets: an unknown option becomes an InvalidArgumentError that names it
    and lists the valid ones (Python would raise a bare TypeError), and a concrete sigma grid is validated."""
    options = [name for name, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY]

    @functools.wraps(fn)
    def checked(denoise, x, sigmas, key=None, **given):
        unknown = sorted(set(given) - set(options))
        if unknown:
            raise InvalidArgumentError(
                f"{fn.__name__}: unknown option {unknown[0]!r}; valid options: {', '.join(options) or 'none'}")
        check_sigmas(sigmas)
        return fn(denoise, x, sigmas, key, **given)

    checked.nfe = nfe
    return checked


def register(name: str, *, nfe: Callable[[int], int] | None = one_per_step, aliases: tuple[str, ...] = (),
             internal: bool = False):
    """Decorate `fn(denoise, x, sigmas, key=None, *, option=default, ...) -> x` as the sampler `name`.

    nfe: steps -> denoiser evaluations at run time (None for adaptive samplers); it becomes `fn.nfe`.
    aliases: further names for the same function (`plms` for `pndm`). internal: file it in INTERNAL_SAMPLERS.
    Returns the checked function, so the module-level name is what the registry hands out.
    """
    def decorate(fn):
        checked = _checked(fn, nfe)
        table = INTERNAL_SAMPLERS if internal else SAMPLERS
        for key in (name, *aliases):
            if key in SAMPLERS or key in INTERNAL_SAMPLERS:
                raise ValueError(f"sampler name {key!r} is registered twice")
            table[key] = checked
        return checked
    return decorate


def get_sampler(name: str, *, public_only: bool = False):
    """The sampler called `name`, or an InvalidArgumentError suggesting the closest public name.

    Internal samplers resolve too, because a plan from a scheduler config names them; pass public_only=True
    where the name comes from a user (a CLI flag, `Pipeline.generate(sampler=...)`).
    """
    if name in SAMPLERS:
        return SAMPLERS[name]
    if name in INTERNAL_SAMPLERS and not public_only:
        return INTERNAL_SAMPLERS[name]
    hint = did_you_mean(name, SAMPLERS)
    if name in INTERNAL_SAMPLERS:
        hint = " It reproduces diffusers scheduler configs only and is not a public sampler."
    raise InvalidArgumentError(
        f"unknown sampler {name!r}.{hint} Valid names: {', '.join(sorted(SAMPLERS))}")
