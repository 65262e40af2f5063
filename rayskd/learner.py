"""Learner: one rank of a DeepSpeed engine (ZeRO stage from the config; gloo on CPU, NCCL on
GPU). An update (`train_step`) is: this rank's share of the batch as micro-batches
(`share_micro_batches`), each one's loss (`micro_batch_loss`, the objective's terms from
losses/) and backward, one optimizer step, and the metrics (`StepMetrics`)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields

import torch

from . import learner_state
from .actor_logs import log_to_file
from .batch import (
    MIXTURE, ORIGINS, STUDENT, STUDENT_SAMPLED, LearnerShare, RehearsalRows, RolloutSummary, combine_scores,
    concat_scores, concat_shards, forward_fields, micro_batches, student_sampled,
)
from .config import AlgorithmConfig, LearnerConfig
from .losses import (
    TEACHER_ESTIMATORS, TeacherSignal, batch_normalisers, group_advantages, importance_weights, kd_sequence_mask,
    policy_gradient_term, rehearsal_loss, teacher_term,
)
from .modeling import PolicyModel, load_causal_lm, load_output_head, vocab_limit
from .weight_sync import WeightGroup, WeightLayout, pack, plan_layout, to_numpy


def learner_shares(summaries: list[RolloutSummary], shards: list, scores: list, ranks: int, algo: AlgorithmConfig,
                   max_new_tokens: int, kd_coef: float, rehearsal_start: int,
                   taid_t: float = 1.0, combine: str = "route",
                   teacher_coefs: list[float] = (1.0,)) -> list[LearnerShare]:
    """Each learner rank's contiguous share of a step's requests (`summaries[i]` describes
    `shards[i]`, scored as `scores[i]`: a list, one per teacher that scored it): whole requests
    per rank, with the KD mask of its sequences and the normalisers of the whole batch, both
    decided here once."""
    lengths = torch.tensor([n for s in summaries for n in s.response_len])
    rewards = torch.tensor([r for s in summaries for r in s.rewards], dtype=torch.float32)
    kd_mask_N = kd_sequence_mask(rewards, summaries[0].group_size, algo.kd.mask)
    _, kd_total = batch_normalisers(lengths, kd_mask_N, aggregation=algo.aggregation, kd_norm=algo.kd.norm,
                                    max_new_tokens=max_new_tokens)
    # the GRPO term's normaliser counts the student's own samples only (the term is theirs)
    own = torch.tensor([o in STUDENT_SAMPLED for s in summaries for o in (s.origin or [STUDENT] * len(s.uids))])
    pg_total = batch_normalisers(lengths[own], kd_mask_N[own], aggregation=algo.aggregation, kd_norm=algo.kd.norm,
                                 max_new_tokens=max_new_tokens)[0] if bool(own.any()) else 1.0
    per_rank = len(summaries) // ranks
    scores = [part if isinstance(part, list) else [part] for part in scores]
    starts = [0]
    for s in summaries:
        starts.append(starts[-1] + len(s.uids))
    return [LearnerShare(kd_coef=kd_coef, rehearsal_start=rehearsal_start, pg_denominator=pg_total,
                         kd_denominator=kd_total,
                         kd_mask=kd_mask_N[starts[r * per_rank]:starts[(r + 1) * per_rank]].tolist(),
                         shards=shards[r * per_rank:(r + 1) * per_rank],
                         scores=[ref for part in scores[r * per_rank:(r + 1) * per_rank] for ref in part],
                         score_parts=[len(part) for part in scores[r * per_rank:(r + 1) * per_rank]],
                         taid_t=taid_t, combine=combine, teacher_coefs=tuple(teacher_coefs))
            for r in range(ranks)]


def train_step_args(share: LearnerShare) -> tuple:
    """A share as `Learner.train_step`'s arguments through Ray: the shards' and scores' object refs
    as arguments of their own, which Ray fetches before the call (the learner imports no Ray)."""
    return (share, *share.shards, *share.scores)


def _add_elementwise(parts: list[tuple]) -> tuple:
    """Tuples of sums added position by position (the empty ones left out)."""
    return tuple(map(sum, zip(*[p for p in parts if p])))


@dataclass
class StepMetrics:
    """Sums over micro-batches and ranks of an update; `merge` adds them (a field's `reduce`
    overrides the sum), `record` derives the logged means (metrics.StepRecord's learner fields).
    A new metric is one field here, its value in `micro_batch_loss`, and its record field."""
    tokens: float = 0.0
    policy_loss: float = 0.0  # each micro-batch's share of the batch aggregate: they add up
    kd_loss: float = 0.0
    kd_k1_sum: float = 0.0  # k1 of KL(student || teacher) summed over the KD-masked tokens
    kd_tokens: float = 0.0
    kd_weight_sum: float = 0.0  # the teacher term's importance weights, over the KD-masked tokens
    entropy_sum: float = 0.0
    clip_sum: float = 0.0
    sampled_tokens: float = 0.0  # tokens of the student's own samples (the GRPO term's, and a sampler's)
    mismatch_k3_sum: float = 0.0  # sampler (vLLM) vs learner log-probs of the same tokens
    tis_weight_sum: float = 0.0
    rehearsal_loss: float = 0.0
    nonfinite: int = 0
    teacher_nonfinite_tokens: int = 0  # response tokens the teacher gave a non-finite value
    teacher_nonfinite_sequences: int = 0  # (not trained on by the teacher term)
    nonfinite_teachers: tuple = field(default=(), metadata={"reduce": lambda v: tuple(sorted(set().union(*v)))})
    # several teachers: (k1 sum, tokens) of each teacher's divergence, flat, over the KD-masked tokens it scored
    kd_k1_by_teacher: tuple = field(default=(), metadata={"reduce": _add_elementwise})
    # sequences of other origins (algorithm.gkd): the same, per origin (batch.ORIGINS)
    kd_k1_by_origin: tuple = field(default=(), metadata={"reduce": _add_elementwise})
    mismatch_max: float = field(default=0.0, metadata={"reduce": max})
    grad_norm: float = field(default=float("nan"), metadata={"reduce": lambda v: v[0]})  # global: same on all ranks
    # learner.log_term_grads: (GRPO term's, teacher term's gradient norm, their cosine), global
    term_grads: tuple = field(default=(), metadata={"reduce": lambda v: v[0]})
    skipped: bool = field(default=False, metadata={"reduce": any})

    @classmethod
    def merge(cls, parts: list["StepMetrics"]) -> "StepMetrics":
        return cls(**{f.name: f.metadata.get("reduce", sum)([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def record(self, algo: AlgorithmConfig) -> dict:
        """The learner's fields of the step's record (metrics.StepRecord)."""
        tokens, sampled = max(self.tokens, 1.0), max(self.sampled_tokens, 1.0)
        return {
            # masked mean over the tokens the teacher term saw (None when the KD mask selected none)
            "kd_divergence": self.kd_k1_sum / self.kd_tokens if self.kd_tokens else None,
            "kd_tokens": int(self.kd_tokens), "kd_loss": self.kd_loss, "policy_loss": self.policy_loss,
            "kd_weight_mean": self.kd_weight_sum / self.kd_tokens if self.kd_tokens else None,
            "entropy": self.entropy_sum / tokens, "clip_frac": self.clip_sum / sampled, "grad_norm": self.grad_norm,
            "sampler_mismatch_max": self.mismatch_max, "sampler_mismatch_k3": self.mismatch_k3_sum / sampled,
            "skipped_update": self.skipped, "nonfinite_losses": self.nonfinite,
            "tis_weight_mean": self.tis_weight_sum / sampled if algo.tis_cap > 0 else None,
            "rehearsal_loss": self.rehearsal_loss if algo.rehearsal.coef > 0 else None,
            "teacher_nonfinite_tokens": self.teacher_nonfinite_tokens,
            "teacher_nonfinite_sequences": self.teacher_nonfinite_sequences,
            "nonfinite_teachers": list(self.nonfinite_teachers),
            # each teacher's k1 of KL(student || teacher i) over the KD-masked tokens it scored
            "kd_divergence_by_teacher": _means(self.kd_k1_by_teacher),
            "kd_divergence_by_origin": dict(zip(ORIGINS, _means(self.kd_k1_by_origin))) if self.kd_k1_by_origin else None,
            **dict(zip(("pg_grad_norm", "kd_grad_norm", "term_grad_cosine"), self.term_grads)),
        }


def _means(sums_and_counts: tuple) -> list | None:
    """(sum, count, sum, count, ...) -> [mean, ...] (None where the count is 0); () -> None."""
    return [s / n if n else None for s, n in zip(sums_and_counts[::2], sums_and_counts[1::2])] or None


@dataclass(frozen=True)
class LearnerSpec:
    """What every learner rank is built from (the rank and the rendezvous come separately)."""
    model_path: str
    cfg: LearnerConfig
    algo: AlgorithmConfig
    sampling_temperature: float
    max_new_tokens: int
    tokenizer_len: int
    seed: int
    # a hidden-state teacher (teacher.send_hidden): its path (the learner holds its LM head) and
    # the temperature its logits are taken at
    teacher_head_path: str | None = None
    teacher_temperature: float = 1.0

    @classmethod
    def from_config(cls, cfg, tokenizer_len: int) -> "LearnerSpec":
        return cls(model_path=cfg.student.path, cfg=cfg.learner, algo=cfg.algorithm,
                   sampling_temperature=cfg.rollout.temperature, max_new_tokens=cfg.rollout.max_new_tokens,
                   tokenizer_len=tokenizer_len, seed=cfg.run.seed,
                   teacher_head_path=cfg.teacher.path if cfg.teacher.send_hidden else None,
                   teacher_temperature=cfg.teacher.temperature)


# ---- an update in pieces: the share's micro-batches, each one's loss ----

@dataclass
class MicroBatch:
    """Rows of a rank's share, cut to their widths, on the learner's device: what the forward
    reads (`fields`, the teacher's top-k or draws when the estimator needs them) and what the
    loss reads."""
    fields: tuple  # prompt_ids_NP, prompt_len_N, response_ids_NR, response_len_N (batch.forward_fields)
    mask_NR: torch.Tensor
    advantages_N: torch.Tensor
    sampler_logp_NR: torch.Tensor  # mu: the engine's log-probs of the sampled tokens
    teacher_logp_NR: torch.Tensor
    kd_mask_N: torch.Tensor
    topk_ids_NRK: torch.Tensor | None = None
    teacher_topk_logp_NRK1: torch.Tensor | None = None
    taid_t: float = 1.0
    # the teacher's draws (teacher.sparse_samples): ids, their log-probs and log weights
    sample_ids_NRS: torch.Tensor | None = None
    teacher_sample_logp_NRS: torch.Tensor | None = None
    teacher_sample_logw_NRS: torch.Tensor | None = None
    teacher_hidden_NRH: torch.Tensor | None = None  # a hidden-state teacher's (teacher.send_hidden)
    # several teachers: each sequence's coefficient on the teacher term (route), and for the
    # per-teacher metrics each row's teacher (route) or each teacher's log-probs (ensemble)
    kd_coef_N: torch.Tensor | None = None
    teacher_N: torch.Tensor | None = None
    teacher_logp_TNR: torch.Tensor | None = None
    teachers: int = 1
    origin_N: torch.Tensor | None = None  # None: all the student's own samples (batch.ORIGINS)

    def forward_kwargs(self) -> dict:
        if self.teacher_hidden_NRH is not None:
            return {"teacher_hidden_NRH": self.teacher_hidden_NRH, "taid_t": self.taid_t}
        if self.sample_ids_NRS is not None:
            return {"sample_ids_NRS": self.sample_ids_NRS, "teacher_sample_logp_NRS": self.teacher_sample_logp_NRS,
                    "teacher_sample_logw_NRS": self.teacher_sample_logw_NRS}
        if self.topk_ids_NRK is None:
            return {}
        return {"topk_ids_NRK": self.topk_ids_NRK, "teacher_topk_logp_NRK1": self.teacher_topk_logp_NRK1,
                "taid_t": self.taid_t}


def share_micro_batches(shards: list, scores: list, share: LearnerShare, algo: AlgorithmConfig, cfg: LearnerConfig,
                        device) -> list[MicroBatch]:
    """A rank's share of an update (its rollout shards and their teacher scores) as
    micro-batches of `micro_batch_size` rows, or length-grouped by `max_tokens_per_micro_batch`,
    with the share's advantages (whole groups: each request holds whole groups)."""
    batch = concat_shards(shards)
    parts = share.scores_by_shard(scores)
    teacher = concat_scores([combine_scores(p, shard.num_sequences, share.combine, share.teacher_coefs)
                             for p, shard in zip(parts, shards)], batch.response_ids_NR.shape[1])
    coefs = torch.tensor(share.teacher_coefs, dtype=torch.float64)
    kd_coef_N = coefs[teacher.teacher_N] if teacher.teacher_N is not None else None
    mask_NR = batch.response_mask_NR()
    adv_N = group_advantages(batch.rewards_N, batch.group_size, algo.advantage)
    # a sequence the teacher gave a non-finite value (zeroed by the teacher) gets no teacher term
    kd_mask_N = torch.tensor(share.kd_mask, dtype=torch.float32) * (teacher.nonfinite() == 0)
    distribution = TEACHER_ESTIMATORS[algo.kd.estimator].distribution
    out = []
    for idx in micro_batches(batch.prompt_len_N + batch.response_len_N, cfg.micro_batch_size,
                             cfg.max_tokens_per_micro_batch):
        rows = forward_fields(batch, idx)
        r = rows[2].shape[1]

        def cut(t, idx=idx, r=r):  # a [N, R, ...] tensor's rows and width, on the device
            return t[idx, :r].to(device)

        def dist(t):  # the teacher's distribution payload, where the estimator reads it (else None)
            return cut(t) if distribution and t is not None else None

        out.append(MicroBatch(
            fields=rows, mask_NR=cut(mask_NR), advantages_N=adv_N[idx].to(device),
            sampler_logp_NR=cut(batch.sampler_logp_NR), teacher_logp_NR=cut(teacher.logp_NR),
            kd_mask_N=kd_mask_N[idx].to(device),
            topk_ids_NRK=dist(teacher.topk_ids_NRK), teacher_topk_logp_NRK1=dist(teacher.topk_logp_NRK1),
            taid_t=share.taid_t, sample_ids_NRS=dist(teacher.sample_ids_NRS),
            teacher_sample_logp_NRS=dist(teacher.sample_logp_NRS),
            teacher_sample_logw_NRS=dist(teacher.sample_logw_NRS), teacher_hidden_NRH=dist(teacher.hidden_NRH),
            kd_coef_N=kd_coef_N[idx].to(device) if kd_coef_N is not None else None,
            teacher_N=teacher.teacher_N[idx].to(device) if teacher.teacher_N is not None else None,
            teacher_logp_TNR=teacher.teacher_logp_TNR[:, idx, :r].to(device) if teacher.teacher_logp_TNR is not None
            else None, teachers=len(share.teacher_coefs),
            origin_N=batch.origin_N[idx].to(device) if bool((batch.origin_N != STUDENT).any()) else None))
    return out


def micro_batch_loss(logp: torch.Tensor, entropy: torch.Tensor | None, divergence: torch.Tensor | None,
                     mb: MicroBatch, share: LearnerShare, algo: AlgorithmConfig,
                     norm_len: int) -> tuple[torch.Tensor, StepMetrics]:
    """The objective on one micro-batch (`micro_batch_terms` added up): (loss, metrics)."""
    pg, teacher, metrics = micro_batch_terms(logp, entropy, divergence, mb, share, algo, norm_len)
    return pg + teacher, metrics


def micro_batch_terms(logp: torch.Tensor, entropy: torch.Tensor | None, divergence: torch.Tensor | None,
                      mb: MicroBatch, share: LearnerShare, algo: AlgorithmConfig,
                      norm_len: int) -> tuple[torch.Tensor, torch.Tensor, StepMetrics]:
    """The objective on one micro-batch: pg_coef x the GRPO term + kd_coef x the teacher term,
    each with its off-policy weight (`losses.importance_weights`: one rule, whatever the
    staleness) and divided by the whole batch's normaliser (so micro-batches and ranks add up).
    logp [B, T]: log pi_theta of the sampled tokens at the sampling temperature (with gradient);
    entropy [B, T] (or None); divergence [B, T]: the per-position divergence to the teacher's
    distribution, for a distribution estimator. Returns (pg_coef x the GRPO term, kd_coef x the
    teacher term, this micro-batch's metrics): their sum is the loss."""
    kd = algo.kd
    estimator = TEACHER_ESTIMATORS[kd.estimator]
    # the GRPO term is the student's own samples' (replayed ones too: their sampler's log-probs are
    # mu, however old); a sequence no sampler drew (a dataset response) has no behaviour policy:
    # mu = sg(pi_theta) there, every ratio 1
    own_NR = mb.mask_NR if mb.origin_N is None else mb.mask_NR * student_sampled(mb.origin_N)[:, None]
    sampler_logp = mb.sampler_logp_NR if mb.origin_N is None else torch.where(
        student_sampled(mb.origin_N)[:, None], mb.sampler_logp_NR, logp.detach())
    if mb.origin_N is not None and bool((mb.origin_N == MIXTURE).any()):  # MiniLLM's mixed sampling
        sampler_logp = torch.where((mb.origin_N == MIXTURE)[:, None],
                                   mixture_logp(mb.teacher_logp_NR, logp.detach(), kd.minillm.mix_alpha), sampler_logp)
    w = importance_weights(logp, sampler_logp, algo.tis_cap, kd.is_cap)
    pg, clipped = policy_gradient_term(logp, mb.advantages_N, own_NR, w, clip_low=algo.clip_low,
                                       clip_high=algo.clip_high, aggregation=algo.aggregation, norm_len=norm_len,
                                       denominator=share.pg_denominator)
    values = estimator.values(logp, TeacherSignal(mb.teacher_logp_NR, divergence, mb.mask_NR, w.teacher_weight,
                                                  kd.minillm.gamma, kd.minillm.length_norm))
    if mb.kd_coef_N is not None:  # routed teachers: each sequence's teacher's coefficient
        values = values * mb.kd_coef_N[:, None].to(values.dtype)
    teacher = teacher_term(values, mb.mask_NR, mb.kd_mask_N, w.teacher_weight if estimator.sampled else None,
                           norm=kd.norm, aggregation=algo.aggregation, norm_len=norm_len,
                           denominator=share.kd_denominator)
    with torch.no_grad():
        mask, current = mb.mask_NR, logp.detach()
        kd_mask = mask * mb.kd_mask_N[:, None]
        delta = (sampler_logp - current) * own_NR
        tis = w.pg_weight if w.pg_weight is not None else torch.zeros_like(mask)
        sums = torch.stack([
            mask.sum(), own_NR.sum(), pg.detach(), teacher.detach(), ((current - mb.teacher_logp_NR) * kd_mask).sum(),
            kd_mask.sum(), (w.teacher_weight * kd_mask).sum(),
            (entropy * mask).sum() if entropy is not None else mask.new_zeros(()),
            (clipped * own_NR).sum(), ((torch.expm1(-delta) + delta) * own_NR).sum(), (tis * own_NR).sum(),
            ((sampler_logp.exp() - current.exp()).abs() * own_NR).max() if mask.numel() else mask.new_zeros(()),
        ]).double().tolist()
        by_teacher = per_teacher_k1(current, mb, kd_mask) if mb.teachers > 1 else ()
        by_origin = () if mb.origin_N is None else _k1_by_group(current - mb.teacher_logp_NR, kd_mask, mb.origin_N,
                                                                 len(ORIGINS))
    names = ("tokens", "sampled_tokens", "policy_loss", "kd_loss", "kd_k1_sum", "kd_tokens", "kd_weight_sum",
             "entropy_sum", "clip_sum", "mismatch_k3_sum", "tis_weight_sum", "mismatch_max")
    return (algo.pg_coef * pg, share.kd_coef * teacher,
            StepMetrics(**dict(zip(names, sums)), kd_k1_by_teacher=by_teacher, kd_k1_by_origin=by_origin))


def mixture_logp(teacher_logp: torch.Tensor, student_logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """log(alpha pi_T + (1 - alpha) pi_theta) of the tokens: the behaviour policy of MiniLLM's
    teacher-mixed sampling, whose ratio pi_theta / it weights the teacher term."""
    return torch.logaddexp(math.log(alpha) + teacher_logp, math.log1p(-alpha) + student_logp)


def _k1_by_group(diff: torch.Tensor, kd_mask: torch.Tensor, group_N: torch.Tensor, groups: int) -> tuple:
    """(k1 sum, tokens) over the KD-masked tokens of each group's sequences, flat."""
    out = []
    for g in range(groups):
        sel = kd_mask * (group_N == g)[:, None]
        out += [float((diff * sel).sum()), float(sel.sum())]
    return tuple(out)


def per_teacher_k1(logp: torch.Tensor, mb: MicroBatch, kd_mask: torch.Tensor) -> tuple:
    """(k1 sum, tokens) of KL(student || teacher i) for each teacher, flat: routed, over the
    KD-masked tokens of the sequences it scored; an ensemble, each teacher over all of them."""
    if mb.teacher_logp_TNR is None:
        return _k1_by_group(logp - mb.teacher_logp_NR, kd_mask, mb.teacher_N, mb.teachers)
    out = []
    for i in range(mb.teachers):
        out += [float(((logp - mb.teacher_logp_TNR[i]) * kd_mask).sum()), float(kd_mask.sum())]
    return tuple(out)


class Learner:
    def __init__(self, spec: LearnerSpec, *, rank: int, world_size: int, master_addr: str, master_port: int):
        log_to_file()  # in an actor group with a log directory: output to RUN_DIR/logs/
        from . import deepspeed_setup

        self.rank, self.world_size = rank, world_size
        self.gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if self.gpu else torch.device("cpu")
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        deepspeed_setup.init_distributed(self.gpu, master_addr, master_port, rank, world_size)
        self.engine = None
        self.build(spec)

    def build(self, spec: LearnerSpec) -> bool:
        """The student as `spec` has it (its weights from spec.model_path, a new optimizer and
        schedule, the objective's settings), in place of whatever this rank held: a new run on a
        rank that is already up (Trainer's warm actors) starts exactly as on a new one."""
        from . import deepspeed_setup

        if self.engine is not None:  # the previous run's engine, optimizer and model, released
            self.engine.destroy()
            self.engine = self.model = None
            import gc

            gc.collect()
        cfg, algo = spec.cfg, spec.algo
        self.cfg, self.algo = cfg, algo
        self.temperature, self.max_new_tokens = spec.sampling_temperature, spec.max_new_tokens
        torch.manual_seed(spec.seed)
        self.model = model = load_causal_lm(spec.model_path, torch.float32, self.device)
        self.vocab_size = vocab_limit(spec.tokenizer_len, model)
        self.zero3 = cfg.zero_stage == 3
        teacher_head = load_output_head(spec.teacher_head_path, self.device) if spec.teacher_head_path else None
        policy = PolicyModel(model, temperature=self.temperature, chunk=cfg.logprob_chunk, vocab_size=self.vocab_size,
                             device=self.device, zero3=self.zero3, divergence=algo.kd.divergence, beta=algo.kd.beta,
                             skew=algo.kd.skew, teacher_head=teacher_head,
                             teacher_temperature=spec.teacher_temperature)
        optimizer = deepspeed_setup.checked_optimizer(model.parameters(), cfg)
        warmup = cfg.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.engine = deepspeed_setup.initialize(policy, optimizer, scheduler, cfg, self.world_size)
        self.term_grads: torch.Tensor | None = None  # learner.log_term_grads: [2, parameters] this step
        self.rehearsal = None
        if algo.rehearsal.coef > 0:
            from .rehearsal import load_rehearsal

            self.rehearsal = load_rehearsal(algo.rehearsal.data_path)
        return True

    def ready(self) -> bool:
        return True

    # ---- one update ----

    def train_step(self, share: LearnerShare, *fetched) -> StepMetrics:
        """One update: this rank's share in micro-batches (plus its part of the rehearsal chunk),
        each one's loss backward, then one optimizer step. The losses are normalised by the
        whole batch's denominators; DeepSpeed averages the gradients over ranks. `fetched`: the
        share's shards then its scores, as Ray fetched them (`train_step_args`); without them
        the share holds the objects themselves."""
        n = len(share.shards)
        shards, scores = (fetched[:n], fetched[n:]) if fetched else (share.shards, share.scores)
        batches = share_micro_batches(list(shards), list(scores), share, self.algo, self.cfg, self.device)
        health = StepMetrics(teacher_nonfinite_tokens=sum(int(s.nonfinite().sum()) for s in scores),
                             teacher_nonfinite_sequences=sum(int((s.nonfinite() > 0).sum()) for s in scores),
                             nonfinite_teachers=tuple(sorted({s.worker for s in scores if s.nonfinite_N is not None})))
        rehearsal = self._rehearsal_batches(share.rehearsal_start) if self.rehearsal is not None else []
        passes = self._agreed_count(len(batches) + len(rehearsal))
        parts = [self._accumulate(mb, share) for mb in batches] + [self._rehearse(*rb) for rb in rehearsal]
        for _ in range(passes - len(parts)):
            self._zero_pass()
        metrics = StepMetrics.merge([health, *parts])
        if self.cfg.log_term_grads:
            metrics.term_grads = self._term_grad_stats()
        metrics.grad_norm, metrics.skipped = self._optimizer_step(metrics.nonfinite)
        return metrics

    def _forward(self, fields, **kwargs):
        """(log pi_theta of the response tokens at the sampling temperature, their entropy when
        asked, the divergence to the teacher's top-k when asked): `PolicyModel.forward`, through
        the DeepSpeed engine."""
        return self.engine(*fields, **kwargs)

    def _accumulate(self, mb: MicroBatch, share: LearnerShare) -> StepMetrics:
        """Forward and backward one micro-batch of the share."""
        if self.cfg.log_term_grads:
            self._add_term_grads(mb, share)
        logp, entropy, divergence = self._forward(mb.fields, with_entropy=True, **mb.forward_kwargs())
        loss, metrics = micro_batch_loss(logp, entropy, divergence, mb, share, self.algo, self.max_new_tokens)
        metrics.nonfinite = self._backward(loss)
        return metrics

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.engine.module.parameters() if p.requires_grad]

    def _add_term_grads(self, mb: MicroBatch, share: LearnerShare) -> None:
        """learner.log_term_grads: add each term's gradient on this micro-batch, flat, to this
        step's sums. A forward of its own, around the DeepSpeed engine (whose output hooks take
        any backward through its outputs for the update's), and autograd.grad, which leaves .grad
        and DeepSpeed's gradient hooks alone."""
        params = self._trainable()
        logp, entropy, divergence = self.engine.module(*mb.fields, **mb.forward_kwargs())
        terms = micro_batch_terms(logp, entropy, divergence, mb, share, self.algo, self.max_new_tokens)[:2]
        flat = []
        for term in terms:
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True) \
                if term.requires_grad else [None] * len(params)
            flat.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float()
                                   for g, p in zip(grads, params)]))
        step = torch.stack(flat)
        self.term_grads = step if self.term_grads is None else self.term_grads + step

    def _term_grad_stats(self) -> tuple:
        """(|g_pg|, |g_teacher|, cos(g_pg, g_teacher)) of the step's whole batch: each rank's sums
        of its micro-batches' term gradients added over ranks (the losses are shares of the batch
        aggregate, so the sum is the batch's gradient, before clipping)."""
        sums = self.term_grads if self.term_grads is not None else \
            torch.zeros(2, sum(p.numel() for p in self._trainable()), device=self.device)
        self.term_grads = None
        if self.world_size > 1:
            import deepspeed.comm as dist

            dist.all_reduce(sums)
        sums = sums.double()
        norms = sums.norm(dim=1)
        cosine = float(sums[0] @ sums[1] / (norms[0] * norms[1])) if float(norms.prod()) > 0 else float("nan")
        return float(norms[0]), float(norms[1]), cosine

    def _backward(self, loss: torch.Tensor) -> int:
        """Backward one micro-batch (the update is one engine.step() after the last). A
        non-finite loss is turned into NaN gradients, which DeepSpeed's global-norm check turns
        into a skipped update on every rank."""
        bad = int(not torch.isfinite(loss))
        if bad:
            loss = loss * float("nan")
        # DeepSpeed averages the gradients over ranks; our losses are already shares of the
        # batch aggregate, so undo that averaging
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        return bad

    def _optimizer_step(self, nonfinite: int) -> tuple[float, bool]:
        """The update (DeepSpeed skips it on every rank when the global gradient norm is not
        finite): (that norm, whether the update was skipped)."""
        skipped_before = self.engine.skipped_steps
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()  # None when DeepSpeed did not compute it
        return (float(grad_norm) if grad_norm is not None else float("nan"),
                nonfinite > 0 or self.engine.skipped_steps > skipped_before)

    def _agreed_count(self, count: int) -> int:
        """The most micro-batches any rank has this step: ZeRO-2 reduces gradients in every
        backward pass, so every rank must run as many (the others add zero-loss passes)."""
        if self.world_size == 1:
            return count
        import deepspeed.comm as dist

        t = torch.tensor([count], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _zero_pass(self) -> None:
        """A forward and backward that changes no gradient: one token, loss x 0. It takes part in
        every collective a real pass does (ZeRO-2's reductions; ZeRO-3's gathers too)."""
        one = torch.ones(1, 1, dtype=torch.long)
        logp, _, _ = self._forward((one, torch.ones(1, dtype=torch.long), one, torch.ones(1, dtype=torch.long)))
        self._backward(logp.sum() * 0.0)

    def _rehearsal_batches(self, start: int) -> list[tuple[RehearsalRows, torch.Tensor, float]]:
        """This rank's part of the step's chunk of cached reference samples, in micro-batches:
        (rows, the micro-batch's indices, the chunk's token count); none when the rank's part is
        empty."""
        reh = self.algo.rehearsal
        rows = self.rehearsal.take(start, reh.samples_per_step)
        total = max(float(rows.response_len_N.sum()), 1.0)
        per_rank = math.ceil(reh.samples_per_step / self.world_size)
        lo = min(self.rank * per_rank, reh.samples_per_step)
        mine = torch.arange(lo, min(lo + per_rank, reh.samples_per_step))
        lengths = rows.prompt_len_N[mine] + rows.response_len_N[mine]
        sets = micro_batches(lengths, self.cfg.micro_batch_size, self.cfg.max_tokens_per_micro_batch)
        return [(rows, mine[i], total) for i in sets]

    def _rehearse(self, rows: RehearsalRows, idx: torch.Tensor, total: float) -> StepMetrics:
        """DPH-RL: coef x the f-divergence to the initial policy, token mean over the step's
        chunk of cached reference samples (split over ranks and micro-batches)."""
        reh = self.algo.rehearsal
        fields = forward_fields(rows, idx)
        r = fields[2].shape[1]
        mask = rows.response_mask_NR()[idx, :r].to(self.device)
        logp, _, _ = self._forward(fields)
        loss = rehearsal_loss(logp, rows.ref_logp_NR[idx, :r].to(self.device), mask, reh.divergence, reh.alpha,
                              aggregation="token_mean") * (float(mask.sum()) / total)
        return StepMetrics(rehearsal_loss=float(loss), nonfinite=self._backward(reh.coef * loss))

    # ---- checkpoints (rayskd's own format: no pickled objects, see checkpoint.py) ----

    def save_state(self, directory: str, tokenizer_from: str) -> None:
        """Write this rank's part of a checkpoint into `directory` (the staging directory; every
        rank calls this): the student as a Hugging Face model, and the training state in a form
        any number of ranks at any ZeRO stage can resume from (learner_state.py)."""
        self.save_pretrained(os.path.join(directory, "hf"), tokenizer_from)
        counters = {"global_steps": self.engine.global_steps, "global_samples": self.engine.global_samples,
                    "skipped_steps": self.engine.skipped_steps}
        learner_state.save(self.engine, self.model, directory, self.rank, self.world_size,
                           {"scheduler": self.engine.lr_scheduler.state_dict(), "counters": counters})

    def load_state(self, directory: str) -> None:
        """Restore weights, optimizer moments, step, scheduler and counters, whatever the number
        of ranks and the ZeRO stage that wrote them: exact values, so an unchanged layout
        continues bit for bit."""
        meta = learner_state.load(self.engine, self.model, directory, self.rank)
        self.engine.lr_scheduler.load_state_dict(meta["scheduler"])
        for key, value in meta["counters"].items():
            setattr(self.engine, key, value)

    def save_pretrained(self, path: str, tokenizer_from: str) -> None:
        """Write the student as a Hugging Face checkpoint (safetensors) with its tokenizer (rank 0
        writes; under ZeRO-3 every rank must call, to gather the weights)."""
        weights = self.full_state_dict()
        if self.rank != 0:
            return
        from transformers import AutoTokenizer

        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path, state_dict=weights, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(path)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full student state dict, on CPU, on rank 0 (other ranks: empty). ZeRO 0-2 keep the
        whole weights on every rank; under ZeRO-3 every rank takes part in gathering each one."""
        if not self.zero3:
            return {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()} if self.rank == 0 \
                else {}
        import deepspeed

        out = {}
        for name, t in self.model.state_dict(keep_vars=True).items():
            with deepspeed.zero.GatheredParameters([t], modifier_rank=None, enabled=hasattr(t, "ds_id")):
                if self.rank == 0:
                    out[name] = t.detach().contiguous().cpu().clone()
        return out

    # ---- the weight push (weight_sync.py) ----

    def _pushed(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The parameters a push sends, in the model's order, each once: a tied LM head is the
        embedding's parameter and named only under the embedding's name."""
        return list(self.model.named_parameters())

    def weight_layout(self, dtype: str, bucket_bytes: int) -> WeightLayout:
        """The buckets of every push, in the engines' `dtype` (the same on every rank)."""
        shapes = [(name, tuple(getattr(p, "ds_shape", p.shape))) for name, p in self._pushed()]
        return plan_layout(shapes, getattr(torch, dtype), bucket_bytes)

    def _buckets(self, layout: WeightLayout):
        """Each bucket packed on rank 0 (other ranks: None), on the learner's device; under
        ZeRO-3 every rank takes part in gathering one bucket's parameters at a time."""
        import deepspeed

        params = dict(self._pushed())
        for bucket in layout.buckets:
            ps = [params[name] for name, _ in bucket]
            with deepspeed.zero.GatheredParameters(ps, modifier_rank=None, enabled=self.zero3):
                yield pack(ps, layout.torch_dtype) if self.rank == 0 else None

    def weight_buckets(self, layout: WeightLayout) -> list | None:
        """The object-store transport's payload: every bucket as a numpy array (which Ray stores
        and hands to the engines without a copy; `weight_sync.from_numpy` turns it back), on
        rank 0; every rank calls."""
        flats = [to_numpy(flat) if flat is not None else None for flat in self._buckets(layout)]
        return flats if self.rank == 0 else None

    def join_weight_group(self, addr: str, port: int, world_size: int, timeout_s: float) -> None:
        """Rank 0: form the collective transport's group with the engines' workers (rank 0 of it)."""
        self.weight_group = WeightGroup(addr, port, 0, world_size, timeout_s, self.device)

    def broadcast_weights(self, layout: WeightLayout) -> int:
        """The collective transport's push: rank 0 broadcasts each bucket (every rank calls)."""
        count = 0
        for flat in self._buckets(layout):
            if flat is not None:
                self.weight_group.broadcast(flat)
                count += 1
        return count

    @torch.no_grad()
    def reference_loss(self, pairs: list[tuple[list[int], list[int]]]) -> tuple[float, int]:
        """DistiLLM's validation loss, as a sum and a count: the token cross-entropy (temperature
        1, over the tokenizer's rows) of each (prompt ids, reference response ids) pair's response
        given its prompt. Every rank computes the same (under ZeRO-3 every rank must call)."""
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(pairs), max(self.cfg.micro_batch_size, 1)):
                chunk = [(p, r) for p, r in pairs[start:start + max(self.cfg.micro_batch_size, 1)] if r]
                if not chunk:
                    continue
                width = max(len(p) + len(r) for p, r in chunk)
                ids = torch.zeros(len(chunk), width, dtype=torch.long)
                attention = torch.zeros(len(chunk), width, dtype=torch.long)
                target = torch.zeros(len(chunk), width - 1)  # 1 where position t predicts a response token
                for i, (p, r) in enumerate(chunk):
                    ids[i, :len(p) + len(r)] = torch.tensor(p + r)
                    attention[i, :len(p) + len(r)] = 1
                    target[i, len(p) - 1:len(p) + len(r) - 1] = 1
                ids, attention, target = ids.to(self.device), attention.to(self.device), target.to(self.device)
                logits = self.model(input_ids=ids, attention_mask=attention).logits[:, :-1, :self.vocab_size].float()
                logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
                total -= float((logp * target).sum())
                count += int(target.sum())
        return total, count

    def sequence_logprobs(self, token_ids: list[int]) -> list[float]:
        """log-softmax over every LM-head row (temperature 1) of tokens 1..end of a fixed
        sequence, to check that the engines serve these weights (`RolloutEngine.sequence_logprobs`
        normalises over every row too: vLLM's prompt log-probs take no logit bias, so the padded
        rows cannot be left out there). Under ZeRO-3 every rank must call."""
        ids = torch.tensor([token_ids], device=self.device)
        logits = self.model(input_ids=ids).logits[0, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1).tolist()
