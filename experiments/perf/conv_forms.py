"""Is XLA:CPU's own 3x3 convolution the fastest way to run one? Beside it, the same convolution written as matmuls
(XLA:CPU's float32 matmul is faster than torch's, its convolution slower): nine shifted matmuls summed, one
im2col matmul (K = 9 C), and three matmuls over kernel rows (K = 3 C), at SD 1.5's U-Net levels, float32, batch 2.
Each form is checked against the convolution (relative L2).

    python -m experiments.perf.conv_forms [--reps 7] [--out experiments/perf/results/conv_forms.md]

XLA:CPU options are process-wide: run it again with XLA_FLAGS=... to compare them (the flags are recorded).
"""
from __future__ import annotations

import os
import time

import numpy as np

from experiments.perf.kernels import cpu_model, table_command

# (batch, side, in channels, out channels): SD 1.5's 3x3 convolutions at 64x64, 32x32 and 16x16 latents, and the
# up path's concatenated skip input.
SHAPES = ((2, 64, 320, 320), (2, 32, 640, 640), (2, 16, 1280, 1280), (2, 64, 640, 320))


def forms():
    import jax
    import jax.numpy as jnp

    def padded(x):
        return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))

    def convolution(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def nine_matmuls(x, w):
        h, v = x.shape[1:3]
        xp = padded(x)
        return sum(xp[:, i:i + h, j:j + v] @ w[i, j] for i in range(3) for j in range(3))

    def im2col(x, w):
        h, v, c = x.shape[1:]
        xp = padded(x)
        columns = jnp.concatenate([xp[:, i:i + h, j:j + v] for i in range(3) for j in range(3)], axis=-1)
        return columns @ w.reshape(9 * c, -1)

    def row_matmuls(x, w):
        h, v, c = x.shape[1:]
        columns = jnp.concatenate([padded(x)[:, :, j:j + v] for j in range(3)], axis=-1)
        return sum(columns[:, i:i + h] @ w[i].reshape(3 * c, -1) for i in range(3))

    return {"convolution": convolution, "9 shifted matmuls": nine_matmuls, "im2col matmul": im2col,
            "3 row matmuls": row_matmuls}


def measure(reps: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    rng, rows = np.random.default_rng(0), []
    for n, side, cin, cout in SHAPES:
        x = jnp.asarray(rng.standard_normal((n, side, side, cin)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.05, jnp.float32)
        compiled = {name: jax.jit(fn) for name, fn in forms().items()}
        reference = np.asarray(compiled["convolution"](x, w), np.float64)
        times = {name: [] for name in compiled}
        for fn in compiled.values():
            jax.block_until_ready(fn(x, w))
        for _ in range(reps):  # interleaved
            for name, fn in compiled.items():
                started = time.perf_counter()
                jax.block_until_ready(fn(x, w))
                times[name].append(time.perf_counter() - started)
        flops = 2 * n * side * side * 9 * cin * cout
        for name, fn in compiled.items():
            error = np.linalg.norm(np.asarray(fn(x, w), np.float64) - reference) / np.linalg.norm(reference)
            rows.append({"shape": f"{side}x{side}, {cin}->{cout}", "form": name,
                         "gflops": flops / float(np.median(times[name])) / 1e9, "error": float(error)})
            print(f"{rows[-1]['shape']:22s} {name:18s} {rows[-1]['gflops']:6.1f} GFLOP/s  rel L2 {error:.1e}",
                  flush=True)
    return rows


def markdown(rows: list[dict], reps: int) -> str:
    import jax

    lines = [f"CPU: {cpu_model()}; {os.cpu_count()} cores; jax {jax.__version__}; "
             f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; float32, batch 2, median of {reps}, interleaved.\n",
             "| shape | form | GFLOP/s | rel L2 to the convolution |", "|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['form']} | {r['gflops']:.1f} | {r['error']:.1e} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return table_command(__doc__, measure, markdown, 7, argv)


if __name__ == "__main__":
    raise SystemExit(main())
