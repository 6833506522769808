"""What `fuse` cannot do with the weights split over the processes (FSDP), refused before it
trains, with what to use instead: full experts, the drift term and resume state outside FSDP2
(under FSDP1), DeepSpeed. The rest of fusion training gathers what it reads whole (merge_lab.training.shards:
`whole`, `whole_state`, `units_whole`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from merge_lab.errors import MergeLabError
from merge_lab.training.shards import dtensor_shards, sharded

if TYPE_CHECKING:
    from merge_lab.moe.train_config import TrainConfig


def refuse_unsupported_sharding(accelerator: Any, cfg: TrainConfig, *, resume: bool = False,
                                checkpoints: bool = False) -> None:
    """What fuse cannot do with the weights split over the processes, refused before it trains,
    with what to use instead (DDP: `--multi_gpu`, or distributed_type MULTI_GPU)."""
    if not sharded(accelerator):
        return
    kind = accelerator.distributed_type.value
    ddp = ("or launch with DDP (`accelerate launch --multi_gpu --num_processes N -m merge_lab fuse ...`, or an "
           "accelerate config with distributed_type MULTI_GPU)")
    if kind == "DEEPSPEED":
        raise MergeLabError(f"`fuse` does not train under DeepSpeed: its gathering of whole weights was not checked "
                            f"(DeepSpeed is not installed where merge_lab is tested). Use an FSDP config {ddp}.")
    if cfg.trainable == "router+experts" and not dtensor_shards(accelerator):
        raise MergeLabError(f"`fuse` trains `trainable: router+experts` under FSDP2 only (fsdp_version: 2 in the "
                            f"accelerate config), where the drift term squares each process's own expert shards; "
                            f"under this {kind} it would read whole experts outside the model's forward. "
                            f"Use fsdp_version 2, train router or router+lora, {ddp}.")
    if any(g > 0 for g in cfg.gamma_values()) and not dtensor_shards(accelerator):
        raise MergeLabError(f"`fuse` trains the drift term (gamma > 0) under FSDP2 only (fsdp_version: 2 in the "
                            f"accelerate config), where each LoRA matrix is gathered inside autograd; under this "
                            f"{kind} its gradient would flow through weights read outside the model's forward. "
                            f"Set gamma to 0, use fsdp_version 2, {ddp}.")
    if (checkpoints or resume) and not dtensor_shards(accelerator):
        raise MergeLabError(f"`fuse` keeps resume state (checkpoint_every, --resume) under FSDP2 only (fsdp_version: 2 "
                            f"in the accelerate config), whose shards it gathers whole; not under this {kind}. "
                            f"Set train.checkpoint_every to 0 and run without --resume, use fsdp_version 2, {ddp}.")
