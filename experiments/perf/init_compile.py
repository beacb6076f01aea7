"""Compile and run time of `Component.init`'s program at LLVM -O2 (XLA's default) and -O1 (what sdjax uses on
CPU), and whether both give the same bits. Random init of each architecture named.

    python -m experiments.perf.init_compile [--models tiny,shapes_unet,shapes_vae,sd15_unet]
"""
import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.models import configs
from sdjax.models.components import COMPONENTS

REPO = Path(__file__).resolve().parents[2]


def _from_file(component: str, path: str):
    raw = {k: v for k, v in json.loads((REPO / path).read_text()).items() if k != "_comment"}
    return component, COMPONENTS[component].config_class.from_dict(raw)


MODELS = {"tiny": lambda: _from_file("unet", "experiments/train_tiny/unet.json"),
          "shapes_unet": lambda: _from_file("unet", "experiments/shapes/model/unet.json"),
          "shapes_vae": lambda: _from_file("vae", "experiments/shapes/model/vae.json"),
          "sd15_unet": lambda: ("unet", configs.SD15_UNET)}


def measure(component: str, config, level: str):
    entry = COMPONENTS[component]
    zeros = lambda specs: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), specs)  # noqa: E731
    args, keywords = (jax.random.key(3), *zeros(entry.example_inputs(config))), zeros(entry.example_keywords(config))
    started = time.perf_counter()
    compiled = jax.jit(entry.build(config).init).lower(*args, **keywords).compile(
        compiler_options={"xla_backend_optimization_level": level})
    compiled_at = time.perf_counter()
    params = jax.block_until_ready(compiled(*args, **keywords))
    return compiled_at - started, time.perf_counter() - compiled_at, [np.asarray(x) for x in jax.tree.leaves(params)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,shapes_unet,shapes_vae,sd15_unet")
    args = parser.parse_args()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line),
                      platform.processor())
    print(f"{model_name}, jax {jax.__version__}\n")
    print("| model | compile -O2 | compile -O1 | run -O2 | run -O1 | same bits |\n|---|---|---|---|---|---|")
    for name in args.models.split(","):
        component, config = MODELS[name]()
        c2, r2, p2 = measure(component, config, "2")
        c1, r1, p1 = measure(component, config, "1")
        same = all(np.array_equal(a, b) for a, b in zip(p1, p2))
        print(f"| {name} | {c2:.1f} s | {c1:.1f} s | {r2:.2f} s | {r1:.2f} s | {same} |", flush=True)


if __name__ == "__main__":
    main()
