"""The teacher term's estimators, one function per name, in the table `algorithm.kd.estimator`
chooses from (the config's check and its error message read the table). docs/algorithms.md,
"The teacher term", has the math of each.

Each estimator maps the student's log-probs of the sampled tokens (with gradient) and what the
teacher returned to per-token values [B, T] whose gradient is the term's. Two kinds:
- sampled-token estimators read only the teacher's log-prob of the token the sampler drew: their
  expectation is taken over that token, so off the student's own policy they need the per-token
  importance weight (`objective.importance_weights`);
- distribution estimators are exact at each position (a divergence over the teacher's
  distribution there, computed in the student's forward): they depend on the prefix only, and
  a weight of the sampled token would add variance and correct nothing.
- MiniLLM's (losses/minillm.py) read the whole response: a reward-to-go of the sampled tokens'
  log-ratios, and a single-step part that is either kind.
Adding an estimator is one function here and one entry in TEACHER_ESTIMATORS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .estimators import kl_estimator
from .minillm import long_part


@dataclass(frozen=True)
class TeacherSignal:
    """What the teacher term reads at each response position [B, T]."""
    logp_NR: torch.Tensor  # the teacher's log-prob of each sampled token
    # the per-position divergence to the teacher's distribution (algorithm.kd.divergence), from
    # the student's forward; None unless the estimator needs the distribution
    divergence_NR: torch.Tensor | None = None
    # what a sequence-level estimator (MiniLLM) reads besides: the response tokens, the
    # sampled-token importance weight (detached) and its reward-to-go settings
    mask_NR: torch.Tensor | None = None
    weight_NR: torch.Tensor | None = None
    gamma: float = 1.0
    length_norm: bool = False


def k2(logp: torch.Tensor, teacher: TeacherSignal) -> torch.Tensor:
    """delta^2 / 2, delta = log pi_theta - log pi_T: gradient delta grad log pi_theta, whose
    expectation under pi_theta is grad KL(pi_theta || pi_T) (KDRL's choice)."""
    return kl_estimator(logp, teacher.logp_NR, "k2")


def k3(logp: torch.Tensor, teacher: TeacherSignal) -> torch.Tensor:
    """exp(-delta) - 1 + delta: an unbiased value of KL(pi_theta || pi_T), but its gradient's
    expectation is grad KL(pi_T || pi_theta), a forward-KL gradient."""
    return kl_estimator(logp, teacher.logp_NR, "k3")


def k1_reward(logp: torch.Tensor, teacher: TeacherSignal) -> torch.Tensor:
    """The k1 penalty -sg(delta) as a per-token reward, written as sg(delta) pi_theta / sg(pi_theta):
    its value is k1 (an unbiased estimate of KL(pi_theta || pi_T)) and its gradient
    sg(delta) grad log pi_theta is exactly k2's."""
    delta = (logp - teacher.logp_NR).detach()
    return delta * torch.exp(logp - logp.detach())


def topk(logp: torch.Tensor, teacher: TeacherSignal) -> torch.Tensor:
    """The divergence algorithm.kd.divergence at each position, on the teacher's top-k tokens
    plus a tail bucket (`divergences.topk_support`), computed in the student's forward."""
    if teacher.divergence_NR is None:
        raise ValueError("a distribution estimator needs the per-position divergence from the student's forward "
                         "(the teacher's top-k distribution, teacher.top_k > 0, its draws, "
                         "teacher.sparse_samples > 0, or its hidden states, teacher.send_hidden)")
    return teacher.divergence_NR


def sparse(logp: torch.Tensor, teacher: TeacherSignal) -> torch.Tensor:
    """Forward KL at each position from ids the teacher drew with importance weights
    (losses/sparse.py: unbiased over the teacher's draws, values and gradient), computed in the
    student's forward. Like topk, a function of the prefix only: no sampled-token weight."""
    return topk(logp, teacher)


def minillm(logp: torch.Tensor, teacher: TeacherSignal) -> torch.Tensor:
    """MiniLLM's sequence-level reverse KL by policy gradient (losses/minillm.py), its single-step
    part from the sampled token: k1_reward plus the long part G_t grad log pi_theta."""
    return k1_reward(logp, teacher) + long_part(logp, teacher.logp_NR, teacher.mask_NR, teacher.gamma,
                                                teacher.length_norm)


def minillm_topk(logp: torch.Tensor, teacher: TeacherSignal) -> torch.Tensor:
    """MiniLLM with its single-step part exact on the teacher's top-k + tail (reverse KL at each
    position, unweighted) and the long part weighted by the sampled token's importance weight."""
    return topk(logp, teacher) + teacher.weight_NR * long_part(logp, teacher.logp_NR, teacher.mask_NR, teacher.gamma,
                                                               teacher.length_norm)


@dataclass(frozen=True)
class TeacherEstimator:
    values: Callable[[torch.Tensor, TeacherSignal], torch.Tensor]
    sampled: bool  # reads the sampled token only: the caller weights it by the importance weight off-policy
    distribution: bool  # needs the teacher's distribution and the divergence in the student's forward
    about: str  # one line, for messages and the docs
    # what of the teacher's distribution it reads: its top-k + tail (teacher.top_k), ids it drew
    # with their importance weights (teacher.sparse_samples), or its final hidden states
    # (teacher.send_hidden: the whole distribution, formed in the learner)
    payload: str = "topk"


TEACHER_ESTIMATORS = {
    "k2": TeacherEstimator(k2, sampled=True, distribution=False,
                           about="delta^2/2 of the sampled token: the reverse-KL gradient (KDRL)"),
    "k3": TeacherEstimator(k3, sampled=True, distribution=False,
                           about="exp(-delta)-1+delta of the sampled token: a forward-KL gradient"),
    "k1_reward": TeacherEstimator(k1_reward, sampled=True, distribution=False,
                                  about="-delta as a per-token reward: k2's gradient, k1's value"),
    "topk": TeacherEstimator(topk, sampled=False, distribution=True,
                             about="algorithm.kd.divergence over the teacher's top-k + tail at each position"),
    "minillm": TeacherEstimator(minillm, sampled=True, distribution=False,
                                about="MiniLLM: sequence-level reverse KL by policy gradient, from sampled tokens"),
    "minillm_topk": TeacherEstimator(minillm_topk, sampled=False, distribution=True,
                                     about="MiniLLM with its single-step part exact on the teacher's top-k + tail"),
    "full": TeacherEstimator(topk, sampled=False, distribution=True, payload="hidden",
                             about="algorithm.kd.divergence over the whole vocabulary, from the teacher's hidden "
                                   "states and its LM head (held by the learner)"),
    "sparse": TeacherEstimator(sparse, sampled=False, distribution=True, payload="sampled",
                               about="forward KL on ids the teacher drew with importance weights (Sparse Logit "
                                     "Sampling): unbiased"),
}
KD_ESTIMATORS = tuple(TEACHER_ESTIMATORS)
