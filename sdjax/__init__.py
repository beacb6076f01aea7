"""sdjax: Stable Diffusion (latent diffusion) in JAX/Flax."""
__version__ = "0.1.0"
import importlib

_EXPORTS = {"Pipeline": "pipeline", "load_pipeline": "pipeline", "GenerationResult": "pipeline", "Edit": "pipeline",
            "Control": "control", "ControlNet": "control", "load_controlnet": "control"}
_MODULES = ("samplers", "schedules", "denoisers", "images")
__all__ = sorted(_EXPORTS) + list(_MODULES)


def __getattr__(name):
    # Imported on first use so that `import sdjax.images` or `sdjax.samplers` does not build every model module.
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"sdjax.{_EXPORTS[name]}"), name)
    if name in _MODULES:
        return importlib.import_module(f"sdjax.{name}")
    raise AttributeError(f"module 'sdjax' has no attribute {name!r}")
