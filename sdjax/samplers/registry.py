"""Name -> sampler function, merged from the modules that define them."""
from __future__ import annotations

import difflib

from sdjax.errors import InvalidArgumentError
from sdjax.samplers import diffusers_solvers, multistep, singlestep

SAMPLERS = {**singlestep.SAMPLERS, **multistep.SAMPLERS, **diffusers_solvers.SAMPLERS}


def get_sampler(name: str):
    """The sampler called `name`, or an error listing the valid names."""
    try:
        return SAMPLERS[name]
    except KeyError:
        close = difflib.get_close_matches(name, SAMPLERS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InvalidArgumentError(
            f"unknown sampler {name!r}.{hint} Valid names: {', '.join(sorted(SAMPLERS))}") from None
