"""TAID, temporally adaptive interpolated distillation (Shing et al., arXiv 2501.16937; the
authors' code is SakanaAI/TAID, src/distil_losses/taid.py). docs/algorithms.md, "TAID".

The student learns by forward KL from an intermediate distribution that moves from its own
towards the teacher's as training goes:

    p_t = softmax((1 - t) sg(log Q_theta) + t log P_T),   loss = KL(p_t || Q_theta)

(the authors interpolate logits; log-probs differ from them by a constant per distribution,
which softmax removes). Its gradient in the student's logits is Q_theta - p_t: at t = 1 it is
forward KL's, at t = 0 nothing. t rises from t_start by the paper's adaptive rule
(`TaidState.update`): a momentum of the loss's relative decrease sets how fast, the linear
schedule from t_start to t_end is a floor, and t never falls. t is training state: a
checkpoint holds the whole `TaidState`.

As algorithm.kd.divergence=taid (with estimator=topk: on the teacher's top-k + tail support,
divergences.taid_divergence) the trainer holds the state, sends t with each step's shares,
logs it as taid_t and checkpoints it in trainer.json. The state update reads the teacher term's
value KL(p_t || Q), the paper's J_TAID; the authors' code passes the cross-entropy, larger by
the entropy of p_t.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .divergences import _kl


def taid_target(log_p: torch.Tensor, log_q: torch.Tensor, t: float) -> torch.Tensor:
    """log p_t over the last dim: the normalised geometric mixture Q^(1 - t) P^t, with no
    gradient through the student's side (sg(log Q), as the authors' `logits.detach()`)."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"TAID's t must be in [0, 1], got {t}")
    return torch.log_softmax((1.0 - t) * log_q.detach() + t * log_p, dim=-1)


def taid(log_p: torch.Tensor, log_q: torch.Tensor, t: float) -> torch.Tensor:
    """KL(p_t || Q_theta) per position ([..., V] -> [...]): the value is 0 where the student
    already equals p_t, the gradient in the student's logits Q_theta - p_t. (The authors'
    loss is the cross-entropy -sum p_t log Q_theta: the same gradient, since p_t carries none,
    and a value larger by p_t's entropy.)"""
    return _kl(taid_target(log_p, log_q, t), log_q)


@dataclass(frozen=True)
class TaidState:
    """TAID's training state: the interpolation t, the previous step's loss (None before the
    first) and the momentum of the loss's relative change."""
    t: float
    prev_loss: float | None = None
    momentum: float = 0.0

    def update(self, loss: float, step: int, total_steps: int, t_start: float, t_end: float = 1.0,
               alpha: float = 5e-4, beta: float = 0.99) -> "TaidState":
        """The state after a step whose TAID loss was `loss` (`step` of `total_steps`, counted
        from 1). The first step only records its loss. Then, as the authors' `update_t`:
            m   <- beta m + (1 - beta) (prev_loss - loss) / (prev_loss + 1e-15)
            t   <- min(t_end, max(t_start + (t_end - t_start) step / total_steps,
                                  t + alpha sigmoid(m) (1 - t)))
        A loss falling fast (m > 0) moves t faster towards 1; the linear schedule is a floor."""
        if self.prev_loss is None:
            return replace(self, prev_loss=float(loss))
        relative = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        momentum = beta * self.momentum + (1.0 - beta) * relative
        floor = t_start + (t_end - t_start) * step / total_steps
        grown = self.t + alpha * (1.0 / (1.0 + math.exp(-momentum))) * (1.0 - self.t)
        return TaidState(t=min(t_end, max(floor, grown)), prev_loss=float(loss), momentum=momentum)
