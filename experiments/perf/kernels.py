"""The kernels a U-Net call is made of, sdjax (XLA:CPU) beside torch on the same CPU, interleaved in one run:
attention at the 64x64-latent level of SD 1.5 (4096 tokens, 8 heads x 40), a 2048^3 matmul and a 3x3 convolution
of 320 channels at 64x64 — each in float32 and bfloat16, reported as GFLOP/s (median over repetitions).

    python -m experiments.perf.kernels [--reps 5] [--out experiments/perf/results/kernels.md]

XLA:CPU options are process-wide: run it again with XLA_FLAGS=... to compare them (the flags are recorded).
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import numpy as np

BATCH, TOKENS, HEADS, HEAD_DIM = 2, 4096, 8, 40  # classifier-free guidance doubles SD 1.5's batch of one


def cpu_model() -> str:
    """lscpu's model name, family and model, and the flags that decide bf16 speed (virtual machines often show
    only a generic name such as "AMD EPYC")."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lines)}
    flags = fields.get("Flags", "").split()
    units = [flag for flag in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if flag in flags]
    return (f"{fields.get('Model name', 'unknown')} (family {fields.get('CPU family', '?')}, model "
            f"{fields.get('Model', '?')}; {', '.join(units) or 'no AVX-512/AMX'})")


def product_operand_types(hlo: str, op: str) -> list[tuple[str, ...]]:
    """The element types of the operands of every `op` ("dot", "convolution") in an optimised HLO module's text
    (instruction names are unique within a module)."""
    types = dict(re.findall(r"(%[\w.\-]+) = (\w+)\[", hlo))
    return [tuple(types.get(name, "?") for name in re.findall(r"%[\w.\-]+", operands))
            for operands in re.findall(rf" {op}\(([^)]*)\)", hlo)]


def bfloat16_upcast() -> dict[str, bool]:
    """Whether XLA:CPU computes each bfloat16 product in float32 (converting its operands first), read from the
    optimised HLO: a dot with a bfloat16 result and a convolution are; a dot asked for a float32 result (what
    sdjax's layers ask for, `sdjax.models.products`) runs on bfloat16 operands."""
    import jax
    import jax.numpy as jnp

    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",  # noqa: E731
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    programs = {"dot": (jnp.matmul, (64, 64), (64, 64)),
                "dot with float32 result": (lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32),
                                            (64, 64), (64, 64)),
                "convolution": (conv, (1, 8, 8, 16), (3, 3, 16, 16))}
    result = {}
    for name, (fn, *shapes) in programs.items():
        hlo = jax.jit(fn).lower(*(jnp.zeros(s, jnp.bfloat16) for s in shapes)).compile().as_text()
        operands = product_operand_types(hlo, name.split()[0])
        result[name] = not any(all(t == "bf16" for t in types) for types in operands)
    return result


def cases(dtype_name: str):
    """{name: (sdjax callable, torch callable, flops)} with inputs bound."""
    import jax
    import jax.numpy as jnp
    import torch

    from sdjax.models import products
    from sdjax.models.attention import IMPLEMENTATIONS, attention

    rng = np.random.default_rng(0)
    jdtype, tdtype = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}[dtype_name]
    draw = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    q, k, v = (draw(BATCH, TOKENS, HEADS, HEAD_DIM) for _ in range(3))
    a = draw(2048, 2048)
    x, w = draw(BATCH, 64, 64, 320), draw(3, 3, 320, 320) * 0.05
    j = lambda value: jnp.asarray(value, jdtype)  # noqa: E731
    t = lambda value: torch.from_numpy(np.ascontiguousarray(value)).to(tdtype)  # noqa: E731
    tq, tk, tv = (t(m.transpose(0, 2, 1, 3)) for m in (q, k, v))  # torch's (batch, heads, tokens, dim)
    bound = lambda fn, *args: (lambda: jax.block_until_ready(fn(*args)))  # noqa: E731
    result = {}
    attention_flops = 4 * BATCH * HEADS * TOKENS * TOKENS * HEAD_DIM
    torch_attention = lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)  # noqa: E731
    # auto is one of the others; the Pallas kernel is for TPUs (elsewhere it only interprets)
    on_tpu = jax.default_backend() == "tpu"
    for implementation in (i for i in IMPLEMENTATIONS if i != "auto" and (i != "pallas" or on_tpu)):
        fn = jax.jit(lambda q, k, v, impl=implementation: attention(q, k, v, implementation=impl))
        result[f"attention ({implementation})"] = (bound(fn, j(q), j(k), j(v)), torch_attention, attention_flops)
    ta, tx, tw = t(a), t(x.transpose(0, 3, 1, 2)), t(w.transpose(3, 2, 0, 1))
    # as sdjax's layers compute them: float32 accumulation, and on CPU a bfloat16 convolution as matmuls
    matmul = lambda a, b: products.dot_general(a, b, (((1,), (0,)), ((), ())))  # noqa: E731
    conv = lambda x, w: products.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),  # noqa: E731
                                                      dimension_numbers=products.NHWC)
    result["matmul 2048^3"] = (bound(jax.jit(matmul), j(a), j(a)), lambda: ta @ ta, 2 * 2048 ** 3)
    result["conv 3x3, 320 ch, 64x64"] = (bound(jax.jit(conv), j(x), j(w)),
                                         lambda: torch.nn.functional.conv2d(tx, tw, padding=1),
                                         2 * BATCH * 64 * 64 * 9 * 320 * 320)
    return result


def measure(reps: int) -> list[dict]:
    import torch

    rows = []
    with torch.no_grad():
        for dtype_name in ("float32", "bfloat16"):
            for name, (ours, theirs, flops) in cases(dtype_name).items():
                ours(), theirs()  # compile / warm up
                times = {"sdjax": [], "torch": []}
                for _ in range(reps):  # interleaved, so that the machine's noise hits both alike
                    for side, fn in (("sdjax", ours), ("torch", theirs)):
                        started = time.perf_counter()
                        fn()
                        times[side].append(time.perf_counter() - started)
                medians = {side: float(np.median(values)) for side, values in times.items()}
                rows.append({"kernel": name, "dtype": dtype_name, "flops": flops, **medians})
                print(f"{name:28s} {dtype_name:8s} sdjax {flops / medians['sdjax'] / 1e9:6.1f} GFLOP/s   "
                      f"torch {flops / medians['torch'] / 1e9:6.1f} GFLOP/s", flush=True)
    return rows


def machine() -> str:
    """The line every table starts with: the CPU, the library versions, torch's threads and XLA_FLAGS."""
    import jax
    import torch

    return (f"CPU: {cpu_model()}; {os.cpu_count()} cores; jax {jax.__version__}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


def markdown(rows: list[dict], reps: int) -> str:
    upcast = ", ".join(f"{op} {'in float32' if yes else 'in bfloat16'}" for op, yes in bfloat16_upcast().items())
    lines = [f"{machine()}; median of {reps}, interleaved. XLA:CPU computes bfloat16 {upcast}.\n",
             "| kernel | dtype | sdjax GFLOP/s | torch GFLOP/s | sdjax / torch time |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['kernel']} | {row['dtype']} | {row['flops'] / row['sdjax'] / 1e9:.1f} | "
                     f"{row['flops'] / row['torch'] / 1e9:.1f} | {row['sdjax'] / row['torch']:.2f}x |")
    return "\n".join(lines) + "\n"


def publish(table: str, out: str | None) -> None:
    """Print the markdown table, and write it to `out` when given."""
    print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table)


def table_command(description: str, measure, markdown, reps: int, argv=None) -> int:
    """The command line of a benchmark that measures rows `reps` times and prints them as a markdown table."""
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    publish(markdown(measure(args.reps), args.reps), args.out)
    return 0


def main(argv=None) -> int:
    return table_command(__doc__, measure, markdown, 5, argv)


if __name__ == "__main__":
    raise SystemExit(main())
