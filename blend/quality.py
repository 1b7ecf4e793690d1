"""How far one first-token distribution is from another: the measure the guard and the eval share."""

from __future__ import annotations

import torch


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(reference || other) of the first-token distributions."""
    p_log = torch.log_softmax(reference_logits.double(), -1)
    q_log = torch.log_softmax(logits.double(), -1)
    return float((p_log.exp() * (p_log - q_log)).sum())
