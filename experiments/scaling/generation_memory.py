"""Per-device memory of the compiled generation program (XLA's memory analysis) under data=N and fsdp=N, and
where the compiler put the gathers of the FSDP-split params: in the program's entry, outside every loop (the
U-Net is used only inside the sampler loop, so its gathers there were hoisted out of it: the whole U-Net is then
live on every device for the whole call), or inside the loops (gathered per use).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.scaling.generation_memory [--model M]

The program is the call's own (`Generation.function()`), jitted with the pipeline's shardings; the embedded
shapes model by default.
"""
from __future__ import annotations

import argparse
import re


def gathers_by_computation(hlo: str) -> dict[str, int]:
    """all-gather count per HLO computation, the entry named "entry"."""
    counts, computation = {}, None
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            computation = "entry" if line.startswith("ENTRY") else line.split()[0]
        elif re.search(r"\ball-gather(-start)?\(", line):
            counts[computation] = counts.get(computation, 0) + 1
    return counts


def measure(model: str | None, mesh: str, images: int, steps: int) -> dict:
    import jax

    from sdjax import parallel
    from sdjax.pipeline import load_pipeline

    pipeline = load_pipeline(model, mesh=mesh)
    call = pipeline.prepare("a small red circle", seeds=list(range(images)), steps=steps, sampler="dpmpp_2m")
    batch = parallel.batch_sharding(pipeline.mesh)
    program = jax.jit(call.function(), in_shardings=(parallel.param_shardings(call.params, pipeline.mesh), batch),
                      out_shardings=batch)
    compiled = program.lower(call.params, call.per_image_inputs).compile()
    memory = compiled.memory_analysis()
    gathers = gathers_by_computation(compiled.as_text())
    return {"mesh": mesh, "params": memory.argument_size_in_bytes, "temp": memory.temp_size_in_bytes,
            "gathers outside loops": gathers.get("entry", 0),
            "gathers inside": sum(n for name, n in gathers.items() if name != "entry")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="diffusers folder (default: the embedded shapes model)")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    import jax

    n = jax.device_count()
    mib = lambda b: f"{b / 2 ** 20:.2f}"
    print(f"{n} {jax.devices()[0].platform} devices, {n} images, {args.steps} steps\n")
    print("| mesh | inputs (params) MiB / device | temporaries MiB / device | peak MiB / device | "
          "all-gathers outside loops | inside loops |")
    print("|---|---|---|---|---|---|")
    for mesh in (f"data={n}", f"fsdp={n}"):
        row = measure(args.model, mesh, n, args.steps)
        print(f"| {mesh} | {mib(row['params'])} | {mib(row['temp'])} | {mib(row['params'] + row['temp'])} | "
              f"{row['gathers outside loops']} | {row['gathers inside']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
