"""How wide a greedy decoding batch may be: the rule, fitted to the memory of the machine.

A decoding step reads every weight once whatever the rows (on CPU, SmolLM2-135M on 2 cores: 0.16 s
a step at 8 rows, 0.27 s at 40), so a batch takes every prompt it is given (the interface's batch:
settings.generate_batch_size, longest first) unless their KV caches and the prompt pass's
activations, summed over the candidate's models, would take more than MEMORY_SHARE of the memory
free when it starts (the accelerator's free memory, else the host's available memory); then as many
as fit. `models` are runtime.LoadedModel objects (their `.model` and `.device`).
"""

from __future__ import annotations

from pathlib import Path

import torch


def fitting_rows(models: list, prompt_tokens: int, new_tokens: int, wanted: int) -> int:
    """How many prompts one decoding batch takes: all `wanted` (the interface's batch, at most
    settings.generate_batch_size) unless their KV caches and the prompt pass's activations, summed
    over the models, would take more than MEMORY_SHARE of the memory free now (`row_bytes`)."""
    per_row = sum(row_bytes(lm, prompt_tokens, new_tokens) for lm in models)
    room = int(free_memory(models[0].device) * MEMORY_SHARE)
    return max(1, min(wanted, room // max(per_row, 1)))


# Of the memory free when a decoding batch starts, the share its rows may take (the rest is for
# the weights of models loaded later, the judge, the allocator's slack).
MEMORY_SHARE = 0.25


def row_bytes(lm, prompt_tokens: int, new_tokens: int) -> int:
    """Bytes one row of a decoding batch needs at its peak: its KV cache over prompt and answer,
    one layer's activations over the prompt (hidden states, the MLP's inner width, the attention
    scores) and the next-token logits with their log-softmax (float32)."""
    cfg = getattr(lm.model.config, "text_config", None) or lm.model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    inner = max(getattr(cfg, "intermediate_size", 0) or 0, getattr(cfg, "moe_intermediate_size", 0) or 0)
    width = getattr(lm.model.dtype, "itemsize", 4)
    tokens = prompt_tokens + new_tokens
    cache = 2 * cfg.num_hidden_layers * kv_heads * head_dim * tokens * width
    activations = prompt_tokens * (4 * cfg.hidden_size + 2 * inner) * width + heads * prompt_tokens**2 * 4
    return cache + activations + 3 * cfg.vocab_size * 4


def free_memory(device: str) -> int:
    """Bytes free on `device` now: the accelerator's free memory, else the host's available memory."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # no way to ask: the interface's batch size alone decides
        return 1 << 62
