"""sdjax.parallel: the (data, fsdp) mesh, its errors, and FSDP param shardings (8 virtual CPU devices)."""
import jax
import numpy as np
import pytest

from sdjax import parallel
from sdjax.errors import InvalidArgumentError
from sdjax.models import configs
from sdjax.models.components import COMPONENTS


def test_mesh_sizes_multiply_to_the_device_count():
    assert dict(parallel.make_mesh().shape) == {"data": 8, "fsdp": 1}
    assert dict(parallel.parse_mesh("data=4,fsdp=2").shape) == {"data": 4, "fsdp": 2}
    assert dict(parallel.parse_mesh("fsdp=8").shape) == {"data": 1, "fsdp": 8}
    with pytest.raises(InvalidArgumentError, match="data=3 x fsdp=2 = 6 devices, but there are 8"):
        parallel.parse_mesh("data=3,fsdp=2")
    with pytest.raises(InvalidArgumentError, match="fsdp=3 must be a positive divisor of the device count 8"):
        parallel.make_mesh(fsdp=3)
    with pytest.raises(InvalidArgumentError, match="like data=4,fsdp=2"):
        parallel.parse_mesh("dp=8")


def test_a_pipeline_mesh_comes_from_a_string_a_mesh_or_devices():
    devices = jax.devices()[:4]
    assert parallel.resolve_mesh() is None  # one device
    assert dict(parallel.resolve_mesh(devices=devices).shape) == {"data": 4, "fsdp": 1}
    assert dict(parallel.resolve_mesh("fsdp=2", devices).shape) == {"data": 2, "fsdp": 2}
    assert list(parallel.resolve_mesh("fsdp=2", devices).devices.flat) == devices
    mesh = parallel.make_mesh(fsdp=4)
    assert parallel.resolve_mesh(mesh) is mesh
    with pytest.raises(InvalidArgumentError, match="not both"):
        parallel.resolve_mesh(mesh, devices)
    with pytest.raises(InvalidArgumentError, match=r"mesh axes \('batch',\): sdjax shards over axes"):
        parallel.resolve_mesh(jax.sharding.Mesh(np.asarray(devices), ("batch",)))
    with pytest.raises(InvalidArgumentError, match="data=3 x fsdp=1 = 3 devices, but there are 4"):
        parallel.resolve_mesh("data=3", devices)
    with pytest.raises(InvalidArgumentError, match="pass a string like 'data=4,fsdp=2'"):
        parallel.resolve_mesh(4)


def test_fsdp_splits_each_large_kernel_along_its_largest_divisible_axis():
    assert parallel.fsdp_spec((3, 3, 320, 640), 8) == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert parallel.fsdp_spec((1280, 77), 8) == jax.sharding.PartitionSpec("fsdp")
    assert parallel.fsdp_spec((320,), 8) == jax.sharding.PartitionSpec()  # small: replicated
    assert parallel.fsdp_spec((7, 7, 7, 77), 8) == jax.sharding.PartitionSpec()  # nothing divides


def test_sd15_unet_under_fsdp8_holds_an_eighth_per_device():
    """The SD 1.5 U-Net's params per device, from shapes alone (jax.eval_shape): about 1/8 of 3.4 GB."""
    shapes = COMPONENTS["unet"].param_shapes(configs.SD15_UNET)
    mesh = parallel.parse_mesh("fsdp=8")
    total = parallel.bytes_per_device(shapes, parallel.param_shardings(shapes, parallel.make_mesh()))
    per_device = parallel.bytes_per_device(shapes, parallel.param_shardings(shapes, mesh))
    assert total == 4 * 859_520_964  # float32, replicated: every device holds all of it
    assert total / 8 <= per_device < total / 8 * 1.01, per_device / total
    kernel = shapes["down_blocks.0"]["resnets.0"]["conv1"]["kernel"]
    sharding = parallel.param_shardings(shapes, mesh)["down_blocks.0"]["resnets.0"]["conv1"]["kernel"]
    assert sharding.shard_shape(kernel.shape) == (3, 3, 320, 40)
    # a rule keeps what it names whole on every device
    replicated = parallel.param_shardings(shapes, mesh, rules=((r"conv_in/.*", "replicate"), (r".*", "fsdp")))
    assert replicated["conv_in"]["kernel"].spec == jax.sharding.PartitionSpec()


@pytest.mark.slow
def test_params_are_created_directly_sharded():
    # No attention: fewer params, each an initialiser program to compile twice (sharded and not).
    config = configs.UNetConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                cross_attention_dim=32, attention_head_dim=4,
                                down_block_types=("DownBlock2D", "DownBlock2D"), mid_block_type="UNetMidBlock2D",
                                up_block_types=("UpBlock2D", "UpBlock2D"))
    component = COMPONENTS["unet"]
    mesh = parallel.parse_mesh("data=2,fsdp=4")
    shardings = parallel.param_shardings(component.param_shapes(config), mesh)
    inputs = [np.zeros(s.shape, s.dtype) for s in component.example_inputs(config)]
    init = jax.jit(lambda key: component.build(config).init(key, *inputs)["params"], out_shardings=shardings)
    params = init(jax.random.key(0))
    kernel = params["up_blocks.1"]["resnets.0"]["conv1"]["kernel"]
    assert kernel.sharding == shardings["up_blocks.1"]["resnets.0"]["conv1"]["kernel"]
    assert {shard.data.shape for shard in kernel.addressable_shards} == {(3, 3, 24, 32)}  # (3, 3, 96, 32) split on its largest axis
    # The same values as the component's own init (which compiles the initialisers at LLVM -O1, this jit at -O2).
    jax.tree.map(np.testing.assert_array_equal, params, component.init(config, jax.random.key(0)))
