"""JAX's persistent compilation cache for sdjax's commands: a new process reuses earlier compilations."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdjax" / "jax-compilation"

_hits: list[str] = []
_listening = False


def enable(folder: str | os.PathLike | None = None) -> Path:
    """Turn the cache on and return its folder.

    folder: default $SDJAX_CACHE_DIR, else a cache folder JAX was already given (JAX_COMPILATION_CACHE_DIR),
    else ~/.cache/sdjax/jax-compilation.
    """
    import jax

    global _listening
    folder = Path(folder or os.environ.get("SDJAX_CACHE_DIR") or jax.config.jax_compilation_cache_dir
                  or DEFAULT_CACHE).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if not _listening:  # one listener per process, however often the cache is enabled
        jax.monitoring.register_event_listener(_count_hit)
        _listening = True
    return folder


def hits() -> int:
    """How many programs this process has read from the cache so far."""
    return len(_hits)


def _count_hit(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _hits.append(event)
