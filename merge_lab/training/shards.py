"""Align over several processes: the reply loss as a module DDP (or FSDP) can wrap, each
process's share of it weighted, and the trained weights brought back in one piece.

DDP averages gradients only for work done inside the forward of the module it wraps, and align's
loss applies the output layer at the reply positions only, outside the model's own forward: so
the whole loss is one module, `ReplyLoss`, and that is what `accelerate` prepares. It returns the
token-loss sum and the reply-token count of this process's rows; `share_of_mean` turns them into
this process's term of the batch's token mean, so the gradient DDP averages is the one-process
gradient on the whole global batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from merge_lab.training import chat


def reply_token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the next-token losses on reply tokens, how many reply tokens), with the output
    layer applied only at those positions: the vocabulary projection is a large share of a small
    model's compute, and most positions are prompt."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(lm, lm.base_model_prefix, None)
    head = lm.get_output_embeddings()
    targets = batch["labels"][:, 1:]
    keep = targets != chat.IGNORE
    count = keep.sum()
    if body is None or head is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
    else:
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = head(hidden[:, :-1][keep])
    total = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return total, count


class ReplyLoss(torch.nn.Module):
    """`model`'s reply-token loss on a batch, as one module: what accelerate wraps in DDP / FSDP."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return reply_token_losses(self.model, batch)


def share_of_mean(loss_sum: torch.Tensor, global_tokens: torch.Tensor, world: int) -> torch.Tensor:
    """This process's term of the global batch's mean token loss, times `world`: processes hold
    different reply-token counts, so a per-process mean would weigh their tokens differently;
    DDP averages the `world` gradients, which gives the gradient of the global mean."""
    return loss_sum / global_tokens.clamp_min(1) * world


def sharded(accelerator: Any) -> bool:
    """Whether the prepared model's weights are split over the processes (FSDP, DeepSpeed): then
    no process holds the whole trained model until the weights are gathered."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def dtensor_shards(accelerator: Any) -> bool:
    """Whether the prepared model's weights are FSDP2 shards (DTensors): a read outside the forward
    can then gather one weight inside autograd (`whole`), its gradient landing on each process's chunk."""
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    return sharded(accelerator) and getattr(plugin, "fsdp_version", 1) == 2


def whole(weight: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a DTensor), gathered inside autograd: every process must
    ask for the same weights in the same order. Its backward keeps each process's own chunk of the
    gradient, which is what DDP's averaging gives when every process computes the same term. Any
    other tensor comes back as it is."""
    from torch.distributed.tensor import DTensor

    return weight.full_tensor() if isinstance(weight, DTensor) else weight


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor as `like` holds it: this process's shard where `like` is an FSDP2 DTensor
    (every process must place the same tensors in the same order), else `value` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return value
    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements)


def unsharded_note(accelerator: Any) -> str | None:
    """A note when an FSDP or DeepSpeed config was launched but accelerate trains with DDP (it
    does on CPU processes: it shards only over GPUs and alike), so the user knows every process
    held the whole model; None otherwise."""
    asked = [name for name, env in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
             if os.environ.get(env, "").lower() == "true"]
    if not asked or sharded(accelerator) or accelerator.num_processes == 1:
        return None
    return (f"the {asked[0]} config ran as DDP ({accelerator.distributed_type.value}): accelerate shards weights "
            "only over GPUs (and alike), so each CPU process held the whole model")


def whole_state(accelerator: Any, prepared: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The prepared model's state dict whole, on the main process (None on the others). Every
    process must call it: under FSDP or DeepSpeed accelerate gathers it from all of them
    (`accelerator.get_state_dict`); under DDP or in one process it is the wrapped model's own."""
    if not sharded(accelerator):
        return accelerator.unwrap_model(prepared).state_dict() if accelerator.is_main_process else None
    state = accelerator.get_state_dict(prepared)
    return state if accelerator.is_main_process else None


def units_whole(accelerator: Any, prepared: torch.nn.Module) -> Iterator[list[torch.nn.Module]]:
    """For a read outside the forward (no gradient flows to the shards, nothing is written back):
    the prepared model's modules, one FSDP unit at a time with that unit's own weights whole
    (resharded before the next), so no process holds more than a unit more than FSDP's forward
    does. Yields lists of modules whose weights are whole while the list is in hand: each FSDP2
    unit's own (not its nested units'); all modules at once under FSDP1 (its full parameters
    summoned) or without sharding. Every process must iterate it to the end."""
    if not sharded(accelerator):
        yield list(accelerator.unwrap_model(prepared).modules())
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    if isinstance(prepared, FSDP1):
        with FSDP1.summon_full_params(prepared, writeback=False):
            yield list(prepared.modules())
        return
    for unit in [m for m in prepared.modules() if isinstance(m, FSDPModule)]:
        owned, stack = [], [unit]
        while stack:  # the unit's modules, not those of the units nested in it
            module = stack.pop()
            owned.append(module)
            stack.extend(c for c in module.children() if not isinstance(c, FSDPModule))
        unit.unshard()
        try:
            yield owned
        finally:
            unit.reshard()


def gathered_copy(accelerator: Any, prepared: torch.nn.Module,
                  fresh: Callable[[], torch.nn.Module]) -> torch.nn.Module | None:
    """Under FSDP or DeepSpeed: the trained model whole on the main process (None on the others),
    the state dict gathered from every process's shards (all must call it) loaded into `fresh()`,
    an untrained copy with the same parameter names built on the main process only."""
    state = whole_state(accelerator, prepared)
    if state is None:
        return None
    model = fresh()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model


def trained_model(accelerator: Any, prepared: torch.nn.Module, fresh: Callable[[], torch.nn.Module]) -> torch.nn.Module | None:
    """Align's trained model whole, on the main process (None on the others). Every process must
    call it: under FSDP or DeepSpeed the weights are gathered into `fresh()` (`gathered_copy`);
    under DDP or in one process, the wrapped model is the trained one."""
    if not sharded(accelerator):
        return accelerator.unwrap_model(prepared).model if accelerator.is_main_process else None
    holder = gathered_copy(accelerator, prepared, lambda: ReplyLoss(fresh()))
    return holder.model if holder is not None else None
