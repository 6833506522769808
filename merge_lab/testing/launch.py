"""Several real CPU processes under `accelerate launch`, for tests and benchmarks on a machine
without GPUs: `--multi_gpu` makes accelerate start them through torchrun (they join a gloo group;
`--cpu --num_processes N` would start one), and HF_HOME points into a scratch folder so no user
accelerate config is read."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port nothing listens on now (the processes' rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command(processes: int, *args: str) -> list[str]:
    """`accelerate launch` of `processes` CPU processes running `python ARGS` (e.g. "-m", "merge_lab", ...)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), *args]


def cpu_env(scratch: str | Path, threads: int = 1, **extra: str) -> dict[str, str]:
    """This process's environment for launched CPU processes: `threads` torch threads each, no GPU,
    offline, HF_HOME under `scratch` (no user accelerate config), plus `extra`."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": "",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(Path(scratch) / "hf"), **extra}


def shard_on_cpu(layer_class: str, say=None) -> None:
    """Make every Accelerator created from now on in this process shard with FSDP2 (one unit per
    `layer_class` module), which accelerate would not do on CPU processes (it runs an FSDP config as
    DDP there): the one way a launched test script checks what a GPU run under FSDP does. `say`,
    if given, is told the prepared model's type and the distributed type."""
    import accelerate
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    class ShardedOnCPU(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            accelerate.PartialState().distributed_type = self.state.distributed_type = DistributedType.FSDP
            self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
                fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                transformer_cls_names_to_wrap=[layer_class], state_dict_type="FULL_STATE_DICT")

        def prepare(self, *args):
            prepared = super().prepare(*args)
            if say is not None:
                say(f"prepared {type(prepared[0]).__name__} under {self.distributed_type.value}")
            return prepared

    accelerate.Accelerator = ShardedOnCPU
