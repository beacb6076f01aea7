"""One U-Net call, sdjax beside diffusers-torch on the same weights and the same CPU, interleaved in one run: SD 1.5's
or SD 2.1's architecture (random weights), classifier-free-guidance batch 2, 64x64 latents (512x512 pixels),
each sdjax attention backend named, plus compile time. Also checks that every variant gives torch's output.

    python -m experiments.perf.unet [--arch sd15|sd21] [--dtype float32,bfloat16] [--attention einsum,blocked]
                                    [--reps 3] [--out experiments/perf/results/unet.md]
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np

from experiments.perf.kernels import cpu_model

BATCH, LATENT = 2, 64


def build(arch: str):
    """(diffusers U-Net, sdjax config, sdjax params) with the same random weights."""
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    from sdjax.models import configs
    from sdjax.models.components import COMPONENTS
    from sdjax.weights import keymap

    config = {"sd15": configs.SD15_UNET, "sd21": configs.SD21_UNET}[arch]
    torch.manual_seed(0)
    torch_unet = TorchUNet(**config.to_dict()).eval()
    state = {k: v.detach().numpy() for k, v in torch_unet.state_dict().items()}
    params = keymap.params_from_state_dict(state, COMPONENTS["unet"].param_shapes(config), source=arch)
    return torch_unet, config, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sd15", choices=("sd15", "sd21"))
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or both, comma-separated")
    parser.add_argument("--attention", default="einsum,blocked", help="sdjax backends, comma-separated")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", help="markdown file to write the table to")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    from sdjax.models.components import COMPONENTS

    torch_unet, config, params = build(args.arch)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((BATCH, LATENT, LATENT, 4)).astype(np.float32)
    context = rng.standard_normal((BATCH, 77, config.cross_attention_dim)).astype(np.float32)
    timesteps = np.array([500.0] * BATCH, np.float32)
    calls, compile_seconds, references = {}, {}, {}
    for dtype in args.dtype.split(","):
        jdtype, tdtype = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}[dtype]
        torch_model = copy.deepcopy(torch_unet).to(tdtype)
        torch_inputs = (torch.from_numpy(sample.transpose(0, 3, 1, 2).copy()).to(tdtype),
                        torch.from_numpy(timesteps), torch.from_numpy(context).to(tdtype))

        def torch_call(model=torch_model, inputs=torch_inputs):
            with torch.no_grad():
                return model(*inputs).sample.float().numpy().transpose(0, 2, 3, 1)

        calls[("diffusers-torch", dtype)] = torch_call
        typed_params = jax.tree.map(lambda x: jnp.asarray(x, jdtype), params)
        inputs = tuple(jnp.asarray(x, jdtype) for x in (sample, timesteps, context))
        for backend in args.attention.split(","):
            module = COMPONENTS["unet"].build(config, jdtype, backend)
            fn = jax.jit(lambda p, *a, module=module: module.apply({"params": p}, *a))
            start = time.perf_counter()
            compiled = fn.lower(typed_params, *inputs).compile()
            compile_seconds[(f"sdjax {backend}", dtype)] = time.perf_counter() - start
            calls[(f"sdjax {backend}", dtype)] = lambda c=compiled, p=typed_params, a=inputs: np.asarray(c(p, *a),
                                                                                                         np.float32)
        references[dtype] = torch_call()
    del torch_unet
    check = {}
    for (name, dtype), call in calls.items():  # also the warm-up call
        out = call()
        check[(name, dtype)] = np.linalg.norm(out - references[dtype]) / np.linalg.norm(references[dtype])
    times = {key: [] for key in calls}
    for _ in range(args.reps):  # interleaved: the machine's noise hits every variant alike
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - start)
    median = {key: float(np.median(seconds)) for key, seconds in times.items()}
    lines = [f"CPU: {cpu_model()}; jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} "
             f"threads); {args.arch} U-Net, batch {BATCH}, {LATENT}x{LATENT} latents; median of {args.reps}, "
             "interleaved; each dtype's output compared with torch's in that dtype.", "",
             "| variant | dtype | U-Net call (s) | / torch | / float32 | compile (s) | rel. L2 to torch |",
             "|---|---|---|---|---|---|---|"]
    for (name, dtype), seconds in median.items():
        versus_float32 = f"{seconds / median[(name, 'float32')]:.2f}x" if (name, "float32") in median else "-"
        compile_text = f"{compile_seconds[(name, dtype)]:.1f}" if (name, dtype) in compile_seconds else "-"
        lines.append(f"| {name} | {dtype} | {seconds:.2f} | {seconds / median[('diffusers-torch', dtype)]:.2f}x | "
                     f"{versus_float32} | {compile_text} | {check[(name, dtype)]:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
