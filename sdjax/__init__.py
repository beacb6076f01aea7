"""sdjax: Stable Diffusion (latent diffusion) in JAX/Flax."""
__version__ = "0.1.0"
__all__ = ["Pipeline", "load_pipeline"]


def __getattr__(name):
    # Imported on first use so that `import sdjax.images` or `sdjax.samplers` does not build every model module.
    if name in __all__:
        from sdjax import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'sdjax' has no attribute {name!r}")
