"""Per-device memory of the compiled generation program (XLA's memory analysis) under data=N and fsdp=N, and
where the all-gathers are: outside every loop of the program, or inside a loop (the sampler's, or the VAE's decode
loop). The U-Net runs only inside the sampler loop, so a U-Net gather outside every loop was moved out of it: as
loop-invariant code (before `parallel.per_layer`: the whole gathered U-Net then lived on every device for the
whole call), or with a computation whose input does not change over the steps (the cross-attention keys and values
of the prompt, computed once).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.scaling.generation_memory [--model M]

The program is the one `generate` compiles on that mesh (params placed by the sharding rules, the batch split over
the devices), compiled only, never run. --model: a diffusers folder, the embedded shapes model (default), or `sd15`:
SD 1.5's architecture (sdjax.weights.single_file.SD1's configs: an 860M-param U-Net) at 512x512, its params built
from shapes alone (ShapeDtypeStructs from `jax.eval_shape`, nothing materialised).
"""
from __future__ import annotations

import argparse
import re
from collections import defaultdict

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}
_CALLED = re.compile(r"\b(?:to_apply|calls|body|condition|branch_computations|true_computation|false_computation)="
                     r"(?:\{([^}]*)\}|(%?[\w.\-]+))")
_GATHER = re.compile(r"=\s*(\w+)\[([\d,]*)\][^ ]*\s+all-gather(?:-start)?\(")


def gathers(hlo: str) -> dict[str, list[tuple[int, str]]]:
    """The all-gathers of a compiled program's HLO text, as (output bytes, op_name) each, under "outside" (in a
    computation reached from the entry without entering a while loop) and "inside" (in a loop's body or condition,
    or anything they call)."""
    bodies: dict[str, list[str]] = defaultdict(list)
    computation = entry = None
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            words = line.split()
            computation = words[1] if words[0] == "ENTRY" else words[0]
            entry = computation if words[0] == "ENTRY" else entry
        elif line.startswith(" ") and computation is not None:
            bodies[computation].append(line)
    in_loop: dict[str, bool] = {}
    pending = [(entry, False)]
    while pending:  # every computation reached from the entry, and whether some path to it enters a loop
        name, looped = pending.pop()
        if name in in_loop and (in_loop[name] or not looped):
            continue
        in_loop[name] = looped
        for line in bodies.get(name, ()):
            for match in _CALLED.finditer(line):
                for called in (match.group(1) or match.group(2)).split(","):
                    called = called.strip()
                    pending.append((called if called.startswith("%") else "%" + called,
                                    looped or " while(" in line))
    found: dict[str, list[tuple[int, str]]] = {"outside": [], "inside": []}
    for name, lines in bodies.items():
        for line in lines:
            match = _GATHER.search(line)
            if match is None:
                continue
            elements = 1
            for size in filter(None, match.group(2).split(",")):
                elements *= int(size)
            op_name = re.search(r'op_name="([^"]*)"', line)
            found["inside" if in_loop.get(name, False) else "outside"].append(
                (elements * _BYTES.get(match.group(1), 4), op_name.group(1) if op_name else ""))
    return found


def sd15_pipeline(mesh: str):
    """A Pipeline of SD 1.5's architecture whose params are ShapeDtypeStructs: enough to trace and compile its
    generation program, with nothing materialised (the tokenizer is the embedded model's: only the ids' shapes
    matter)."""
    from sdjax import embedded, parallel
    from sdjax.models.components import COMPONENTS
    from sdjax.pipeline import Pipeline, load_tokenizer
    from sdjax.weights.single_file import SD1

    class Shapes(Pipeline):
        def _placed(self, params):  # nothing to place
            return params

    params = {name: COMPONENTS[name].param_shapes(config) for name, config in SD1.configs.items()}
    return Shapes(SD1.configs, params, load_tokenizer(embedded.EMBEDDED_MODEL / "tokenizer"), dict(SD1.scheduler),
                  mesh=parallel.resolve_mesh(mesh))


def measure(model: str | None, mesh: str, images: int, steps: int, batch_invariant: bool = False) -> dict:
    """The per-device bytes of the program `generate` compiles for `images` images on `mesh`, and its all-gathers
    (`gathers`)."""
    import jax

    from sdjax import parallel
    from sdjax.pipeline import load_pipeline

    pipeline = sd15_pipeline(mesh) if model == "sd15" else load_pipeline(model, mesh=mesh)
    resolution = {"height": 512, "width": 512} if model == "sd15" else {}
    call = pipeline.prepare("a small red circle", seeds=list(range(images)), steps=steps, sampler="dpmpp_2m",
                            batch_invariant=batch_invariant, **resolution)
    # As `generate` places them (Pipeline._run): params by the sharding rules, the batch split over the devices.
    params = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                          call.params, parallel.param_shardings(call.params, pipeline.mesh))
    compiled = pipeline._lower(params, pipeline._shard(call.inputs), call.spec).compile()
    memory = compiled.memory_analysis()
    found = gathers(compiled.as_text())
    hoisted = [size for size, op_name in found["outside"] if "UNet2DConditionModel" in op_name]
    return {"mesh": mesh, "params": memory.argument_size_in_bytes, "temp": memory.temp_size_in_bytes,
            "outside": len(found["outside"]), "inside": len(found["inside"]),
            "unet outside": len(hoisted), "unet outside bytes": sum(hoisted)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="diffusers folder, or sd15 (SD 1.5 from shapes; default: the embedded shapes model)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-invariant", action="store_true", help="images one after another (lax.map)")
    args = parser.parse_args(argv)
    import jax

    n = jax.device_count()
    mib = lambda b: f"{b / 2 ** 20:.2f}"  # noqa: E731
    print(f"{n} {jax.devices()[0].platform} devices, {n} images, {args.steps} steps"
          f"{', batch_invariant' if args.batch_invariant else ''}\n")
    print("| mesh | inputs (params) MiB / device | temporaries MiB / device | peak MiB / device | "
          "all-gathers outside loops | inside loops | U-Net gathers outside loops (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for mesh in (f"data={n}", f"fsdp={n}"):
        row = measure(args.model, mesh, n, args.steps, args.batch_invariant)
        print(f"| {mesh} | {mib(row['params'])} | {mib(row['temp'])} | {mib(row['params'] + row['temp'])} | "
              f"{row['outside']} | {row['inside']} | {row['unet outside']} ({mib(row['unet outside bytes'])}) |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
