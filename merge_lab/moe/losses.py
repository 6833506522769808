"""The fusion training objective, term by term (H3Fusion, with the public code's flaws fixed).

loss = LM loss on response tokens
     + lambda * gating loss: -log of the labelled expert's routing probability, probabilities
       averaged over the example's real (non-pad) tokens and over layers
     + sum_i gamma_i * drift_i, drift_i = ||theta_i - theta_i_initial||^2 over expert i's trainable weights
     + beta * load-balancing loss (Switch Transformer style), optional.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from merge_lab.training.shards import whole


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the positions whose label is not -100 (the response)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def mean_routing_probs(router_logits: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """[batch, experts]: softmax routing probabilities averaged over real tokens and layers."""
    b, t = mask.shape
    probs = torch.stack([torch.softmax(x.float(), dim=-1).view(b, t, -1) for x in router_logits])  # L,B,T,E
    m = mask.to(probs.dtype)[None, :, :, None]
    return (probs * m).sum(dim=(0, 2)) / (len(router_logits) * m.sum(dim=(0, 2)).clamp_min(1.0))


def skip_prefix(mask: torch.Tensor, start: int) -> torch.Tensor:
    """The attention mask without its first `start` positions (the examples' shared prefix)."""
    if start <= 0:
        return mask
    out = mask.clone()
    out[:, :start] = 0
    return out


def gating_loss(mean_probs: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """NLL of the labelled expert's mean routing probability (a probability, so no second softmax)."""
    return -torch.log(mean_probs.gather(1, expert[:, None]).squeeze(1).clamp_min(1e-12)).mean()


def routing_accuracy(mean_probs: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    return (mean_probs.argmax(dim=-1) == expert).float().mean()


def load_balance_loss(router_logits: list[torch.Tensor], mask: torch.Tensor, top_k: int) -> torch.Tensor:
    """E * sum_e (share of real tokens' top-k slots on e) * (mean probability of e), over layers."""
    real = mask.reshape(-1).bool()
    total = router_logits[0].new_zeros((), dtype=torch.float32)
    for x in router_logits:
        x = x[real].float()
        n_exp = x.shape[-1]
        probs = torch.softmax(x, dim=-1)
        chosen = F.one_hot(x.topk(top_k, dim=-1).indices, n_exp).sum(1).float()
        total = total + n_exp * (chosen.mean(0) / top_k * probs.mean(0)).sum()
    return total / len(router_logits)


def expert_drift(current: list[torch.Tensor], initial: list[torch.Tensor]) -> torch.Tensor:
    """[experts]: ||theta_e - theta_e_0||^2 summed over tensors that stack the experts along dim 0.
    Elementwise, so an FSDP2 shard (a DTensor split along dim 0) squares only its own rows, and each
    tensor's [experts] vector is gathered whole in autograd (`whole`): no expert is ever held whole."""
    parts = []
    for c, i in zip(current, initial):
        d = c.float() - i
        parts.append(whole((d * d).sum(dim=tuple(range(1, d.ndim)))))
    return torch.stack(parts).sum(0)
