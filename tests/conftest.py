import os

# Tests never reach a hub; multi-device code runs on 8 simulated CPU devices.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

try:  # torch, the tests' reference, runs models of a few thousand weights: one thread is the fastest by far.
    import torch  # (Its threads spin-wait on each other; beside XLA's own CPU threads on a 2-core machine
except ImportError:  # a tiny pipeline call took 15 s with 2 threads and 0.2 s with 1.)
    pass
else:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory):
    """(folder, torch StableDiffusionPipeline) of a tiny SD1-like model (epsilon, PNDM, quick_gelu)."""
    from tests import fixtures
    folder = tmp_path_factory.mktemp("sd1") / "model"
    return folder, fixtures.save_pipeline_folder(fixtures.SD1, folder)


@pytest.fixture(scope="session")
def sd2_folder(tmp_path_factory):
    """(folder, torch StableDiffusionPipeline) of a tiny SD2-like model (v-prediction, linear proj, gelu)."""
    from tests import fixtures
    folder = tmp_path_factory.mktemp("sd2") / "model"
    return folder, fixtures.save_pipeline_folder(fixtures.SD2, folder)


@pytest.fixture(scope="session")
def sd1_inpaint_folder(tmp_path_factory):
    """(folder, torch pipeline) of a tiny SD1-like inpainting model (9-channel U-Net)."""
    from tests import fixtures
    folder = tmp_path_factory.mktemp("sd1_inpaint") / "model"
    return folder, fixtures.save_pipeline_folder(fixtures.SD1, folder, unet_in_channels=9)


@pytest.fixture
def without_torch(monkeypatch):
    """Call it to make `import torch` fail from then on in the test, as on a machine without torch."""
    import builtins
    real_import = builtins.__import__

    def refuse_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    return lambda: monkeypatch.setattr(builtins, "__import__", refuse_torch)


@pytest.fixture(scope="module")
def transformers_peft_gate():
    """transformers 5.24 refuses its adapter methods (which diffusers' text-encoder LoRA loading calls) below PEFT
    0.22, a version gate; the newest PEFT on the package registry here is 0.21.2, whose API those methods use as
    they need. Lower the gate to the installed version while a module using this fixture runs (a no-op with PEFT
    >= 0.22)."""
    import importlib.metadata

    import transformers.integrations.peft as transformers_peft
    from packaging.version import Version
    installed = importlib.metadata.version("peft")
    with pytest.MonkeyPatch.context() as patch:
        if Version(installed) < Version(transformers_peft.MIN_PEFT_VERSION):
            patch.setattr(transformers_peft, "MIN_PEFT_VERSION", installed)
        yield


@pytest.fixture
def loaded_once(monkeypatch):
    """load_pipeline that keeps what it loaded ({(folder, options): Pipeline}), so that the library calls of a test
    reuse the programs the command compiled for the same settings."""
    from sdjax import pipeline as pipeline_module
    loaded, load = {}, pipeline_module.load_pipeline

    def load_once(folder, **kwargs):
        key = (str(folder), repr(sorted(kwargs.items())))
        if key not in loaded:
            loaded[key] = load(folder, **kwargs)
        return loaded[key]

    monkeypatch.setattr(pipeline_module, "load_pipeline", load_once)
    return loaded
