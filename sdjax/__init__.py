"""sdjax: Stable Diffusion (latent diffusion) in JAX/Flax."""
__version__ = "0.1.0"
_EXPORTS = {"Pipeline": "pipeline", "load_pipeline": "pipeline", "GenerationResult": "pipeline",
            "Control": "control", "ControlNet": "control", "load_controlnet": "control"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # Imported on first use so that `import sdjax.images` or `sdjax.samplers` does not build every model module.
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f"sdjax.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'sdjax' has no attribute {name!r}")
