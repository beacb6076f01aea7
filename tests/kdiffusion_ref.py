"""k-diffusion's `sampling` module, the reference for sampler parity tests.

The package's top-level import pulls optional heavy dependencies (scikit-image, torchvision, clip, ...);
`sampling` itself only needs `utils.append_dims` from them. We load the real `sampling.py` from the
installed k-diffusion under a private package whose `utils` provides just that function.
"""
import importlib.util
import sys
import types

import pytest


def _append_dims(x, target_dims):
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def load():
    """The `k_diffusion.sampling` module, or skip the test when k-diffusion is not installed."""
    if "_kdiff_ref.sampling" in sys.modules:
        return sys.modules["_kdiff_ref.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    root = spec.submodule_search_locations[0]
    package = types.ModuleType("_kdiff_ref")
    package.__path__ = [root]
    utils = types.ModuleType("_kdiff_ref.utils")
    utils.append_dims = _append_dims
    package.utils = utils
    sys.modules["_kdiff_ref"] = package
    sys.modules["_kdiff_ref.utils"] = utils
    sampling_spec = importlib.util.spec_from_file_location("_kdiff_ref.sampling", f"{root}/sampling.py")
    sampling = importlib.util.module_from_spec(sampling_spec)
    sys.modules["_kdiff_ref.sampling"] = sampling
    sampling_spec.loader.exec_module(sampling)
    return sampling
