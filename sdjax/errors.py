"""Specific exceptions. Every message names the file, key or argument at fault and what to do."""
import difflib


class SdjaxError(Exception):
    """Base class of every error sdjax raises on purpose."""


class ConfigError(SdjaxError, ValueError):
    """A model or experiment config has a missing, unknown or unsupported key."""


class WeightsError(SdjaxError, ValueError):
    """A checkpoint is missing, unreadable, or does not match the model it should fill."""


class MissingComponentError(WeightsError, FileNotFoundError):
    """A diffusers folder lacks a component (unet/, vae/, text_encoder/, tokenizer/, ...)."""


class OfflineError(SdjaxError, OSError):
    """A hub id was given but the hub cannot be reached (offline mode or no network)."""


class InvalidArgumentError(SdjaxError, ValueError):
    """A function argument is out of range or inconsistent with the others."""


class NonFiniteLossError(SdjaxError, FloatingPointError):
    """Training met a NaN/inf loss or gradient (its update was dropped) and the config says to stop."""


class DiskFullError(SdjaxError, OSError):
    """The disk has no room for what sdjax must write (a checkpoint, a metrics line)."""


class NonFiniteOutputError(SdjaxError, FloatingPointError):
    """The model produced NaN or inf for some images (they would be silently black). `result` holds the whole
    generation, the finite images included."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


def did_you_mean(value, choices, cutoff: float = 0.6) -> str:
    """" Did you mean 'x'?" for the choice closest to a misspelt `value`, or "" when none is close."""
    close = difflib.get_close_matches(str(value), sorted(map(str, choices)), n=1, cutoff=cutoff)
    return f" Did you mean {close[0]!r}?" if close else ""
