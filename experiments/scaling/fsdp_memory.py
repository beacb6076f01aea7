"""Bytes per device of SD 1.5's params, and of its training state (params + Adam's two moments + EMA), under FSDP
meshes: from shapes alone (`jax.eval_shape`), so it runs anywhere in seconds.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.scaling.fsdp_memory
"""
import jax

from sdjax import parallel
from sdjax.models import configs
from sdjax.models.components import COMPONENTS

PARTS = {"unet": configs.SD15_UNET, "text_encoder": configs.SD15_TEXT, "vae": configs.SD_VAE}
TRAIN_COPIES = 4  # params, Adam's first and second moments, EMA


def main() -> None:
    shapes = {name: COMPONENTS[name].param_shapes(config) for name, config in PARTS.items()}
    count = len(jax.devices())
    print(f"SD 1.5, float32, {count} devices\n")
    print("| mesh | U-Net params / device | all params / device | U-Net training state / device |")
    print("|---|---|---|---|")
    fsdp = 1
    while fsdp <= count:
        mesh = parallel.make_mesh(fsdp=fsdp)
        per_part = {name: parallel.bytes_per_device(tree, parallel.param_shardings(tree, mesh))
                    for name, tree in shapes.items()}
        gib = lambda n: f"{n / 2 ** 30:.2f} GiB"
        print(f"| data={count // fsdp} fsdp={fsdp} | {gib(per_part['unet'])} | {gib(sum(per_part.values()))} | "
              f"{gib(TRAIN_COPIES * per_part['unet'])} |")
        fsdp *= 2


if __name__ == "__main__":
    main()
