"""Learner: one rank of a DeepSpeed engine (ZeRO stage from the config; gloo on CPU, NCCL on
GPU). train_step() computes the student's log-probs at the sampling temperature, the KDRL
objective (+ DPH-RL rehearsal) and one optimizer update per rollout batch."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields

import torch

from . import learner_state
from .actors import log_to_file
from .batch import (
    LearnerShare, RolloutShard, RolloutSummary, TeacherScores, concat_scores, concat_shards, forward_fields, length_mask,
    micro_batches,
)
from .config import AlgorithmConfig, LearnerConfig
from .losses import (
    aggregate_denominator, group_advantages, kd_sequence_mask, kdrl_loss, rehearsal_loss, truncated_is_weights,
)
from .distributed import init_process_group
from .modeling import PolicyModel, load_causal_lm, vocab_limit
from .weight_sync import pack_weights


def batch_normalisers(summaries: list[RolloutSummary], algo: AlgorithmConfig, max_new_tokens: int) -> tuple[float, float]:
    """(GRPO, teacher-term) normalisers of the whole batch, from the requests' summaries: each
    rank trains on its share only, and its slices must add up to the batch's aggregate."""
    lengths = torch.tensor([n for s in summaries for n in s.response_len])
    rewards = torch.tensor([r for s in summaries for r in s.rewards], dtype=torch.float32)
    mask_NR = length_mask(lengths, max(max_new_tokens, int(lengths.max()) if len(lengths) else 1))
    kd_mask_N = kd_sequence_mask(rewards, summaries[0].group_size, algo.kd.mask)
    kd_norm_mask = mask_NR * kd_mask_N[:, None] if algo.kd.norm == "masked" else mask_NR
    return (aggregate_denominator(mask_NR, algo.aggregation, max_new_tokens),
            aggregate_denominator(kd_norm_mask, algo.aggregation, max_new_tokens))


def fetch(items: list) -> list:
    """The values of `items`: object refs are fetched (together), anything else is kept."""
    import ray

    refs = [x for x in items if isinstance(x, ray.ObjectRef)]
    got = iter(ray.get(refs)) if refs else iter(())
    return [next(got) if isinstance(x, ray.ObjectRef) else x for x in items]


@dataclass
class StepMetrics:
    """One rank's sums over its share of an update; `merge` adds the ranks' (a field's
    `reduce` overrides the sum), `record` derives the logged means. A new metric is one field
    here and, when it needs one, a line in `record`."""
    tokens: float = 0.0
    policy_loss: float = 0.0
    kd_loss: float = 0.0
    kd_k1_sum: float = 0.0  # k1 of KL(student || teacher) summed over the KD-masked tokens
    kd_tokens: float = 0.0
    entropy_sum: float = 0.0
    clip_sum: float = 0.0
    mismatch_k3_sum: float = 0.0  # sampler (vLLM) vs learner log-probs of the same tokens
    tis_weight_sum: float = 0.0
    rehearsal_loss: float = 0.0
    nonfinite: int = 0
    mismatch_max: float = field(default=0.0, metadata={"reduce": max})
    grad_norm: float = field(default=float("nan"), metadata={"reduce": lambda v: v[0]})  # global: same on all ranks
    skipped: bool = field(default=False, metadata={"reduce": any})

    @classmethod
    def merge(cls, parts: list["StepMetrics"]) -> "StepMetrics":
        return cls(**{f.name: f.metadata.get("reduce", sum)([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def record(self, algo: AlgorithmConfig) -> dict:
        tokens = max(self.tokens, 1.0)
        out = {
            # masked mean over the tokens the teacher term saw (None when the KD mask selected none)
            "kd_divergence": self.kd_k1_sum / self.kd_tokens if self.kd_tokens else None,
            "kd_tokens": int(self.kd_tokens), "kd_loss": self.kd_loss, "policy_loss": self.policy_loss,
            "entropy": self.entropy_sum / tokens, "clip_frac": self.clip_sum / tokens, "grad_norm": self.grad_norm,
            "sampler_mismatch_max": self.mismatch_max, "sampler_mismatch_k3": self.mismatch_k3_sum / tokens,
            "skipped_update": self.skipped, "nonfinite_losses": self.nonfinite,
        }
        if algo.tis_cap > 0:
            out["tis_weight_mean"] = self.tis_weight_sum / tokens
        if algo.rehearsal.coef > 0:
            out["rehearsal_loss"] = self.rehearsal_loss
        return out


@dataclass(frozen=True)
class LearnerSpec:
    """What every learner rank is built from (the rank and the rendezvous come separately)."""
    model_path: str
    cfg: LearnerConfig
    algo: AlgorithmConfig
    sampling_temperature: float
    max_new_tokens: int
    samples_per_prompt: int
    tokenizer_len: int
    seed: int

    @classmethod
    def from_config(cls, cfg, tokenizer_len: int) -> "LearnerSpec":
        return cls(model_path=cfg.student.path, cfg=cfg.learner, algo=cfg.algorithm,
                   sampling_temperature=cfg.rollout.temperature, max_new_tokens=cfg.rollout.max_new_tokens,
                   samples_per_prompt=cfg.rollout.samples_per_prompt, tokenizer_len=tokenizer_len, seed=cfg.run.seed)


def skip_cpu_shm_comm_op() -> None:
    """On a CPU accelerator, DeepSpeed's communication backend first compiles a C++
    shared-memory all-reduce (deepspeed_shm_comm_op: ~40 s on a fresh machine, a ninja check
    and a load on a warm one, in every rank). It serves only `inference_all_reduce`, which
    training never calls, so the learners go without it (gloo does their collectives)."""
    import importlib
    import sys

    importlib.import_module("deepspeed.comm.torch")
    # by module name: `import deepspeed.comm.torch as m` gives the torch library (the package
    # re-exports comm.py's names, `torch` among them)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


MUON_MODULES = ("deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.zero.muon.original_muon")


def skip_muon_import() -> None:
    """DeepSpeed imports its Muon optimizer lazily, in ZeRO's set-up and update paths, to ask
    whether the optimizer is a Muon one (and to have `muon_update` at hand for parameters marked
    `use_muon`), and that import torch.compiles Muon's kernels: torch._inductor, ~2.2 s of a
    core in every rank (measured on CPU). rayskd always passes its own torch AdamW and marks no
    parameter, so the learners give DeepSpeed stand-ins: a Muon class nothing is an instance
    of, and a `muon_update` that refuses to run (DeepSpeed 0.19.8; tests/test_learner.py)."""
    import sys
    import types

    class MuonWithAuxAdam:  # isinstance(torch AdamW, this) is False, as it should be
        pass

    def muon_update(*args, **kwargs):
        raise RuntimeError("rayskd's learners do not use DeepSpeed's Muon (see learner.skip_muon_import)")

    for name in MUON_MODULES:
        if name not in sys.modules:
            stand_in = types.ModuleType(name, "rayskd: a stand-in, DeepSpeed's Muon is not used by rayskd")
            stand_in.MuonWithAuxAdam, stand_in.muon_update = MuonWithAuxAdam, muon_update
            sys.modules[name] = stand_in


class Learner:
    def __init__(self, spec: LearnerSpec, *, rank: int, world_size: int, master_addr: str, master_port: int):
        log_to_file()  # in an actor group with a log directory: output to RUN_DIR/logs/
        cfg, algo = spec.cfg, spec.algo
        self.cfg, self.algo, self.rank, self.world_size = cfg, algo, rank, world_size
        self.temperature, self.max_new_tokens = spec.sampling_temperature, spec.max_new_tokens
        self.sequences_per_step = algo.prompts_per_step * spec.samples_per_prompt
        self.gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if self.gpu else torch.device("cpu")
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        import deepspeed

        backend = "nccl" if self.gpu else "gloo"
        if not self.gpu:
            skip_cpu_shm_comm_op()
        skip_muon_import()
        init_process_group(backend, master_addr, master_port, rank, world_size)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)  # adopts the group
        torch.manual_seed(spec.seed)
        self.model = model = load_causal_lm(spec.model_path, torch.float32, self.device)
        self.vocab_size = vocab_limit(spec.tokenizer_len, model)
        self.zero3 = cfg.zero_stage == 3
        policy = PolicyModel(model, temperature=self.temperature, chunk=cfg.logprob_chunk, vocab_size=self.vocab_size,
                             device=self.device, zero3=self.zero3, divergence=algo.kd.divergence, beta=algo.kd.beta,
                             skew=algo.kd.skew)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      betas=(0.9, 0.999), fused=self.gpu)
        ds_config = {
            # train_step owns the accumulation: any number of backward passes, then one step()
            # (micro-batches by token budget vary in number from step to step)
            "managed_gradient_accumulation": False,
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": 1,
            "train_batch_size": cfg.micro_batch_size * world_size,
            # clipping also makes DeepSpeed check the global gradient norm: a non-finite one
            # skips the update on every rank (see train_step)
            "gradient_clipping": cfg.grad_clip if cfg.grad_clip > 0 else 1e12,
            "zero_optimization": {"stage": cfg.zero_stage},
            "bf16": {"enabled": cfg.bf16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        warmup = cfg.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config)
        self.rehearsal = None
        if algo.rehearsal.coef > 0:
            from .rehearsal import load_rehearsal

            self.rehearsal = load_rehearsal(algo.rehearsal.data_path)

    def ready(self) -> bool:
        return True

    def _forward(self, fields, **kwargs):
        """log pi_theta of the response tokens at the sampling temperature, their entropy and
        the top-k divergence when asked (`PolicyModel.forward`), through the DeepSpeed engine."""
        return self.engine(*fields, **kwargs)

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

    def train_step(self, share: LearnerShare) -> StepMetrics:
        """One update: this rank trains on its share of the batch (fetched here from the object
        store) in micro-batches (`micro_batch_size` rows, or length-grouped by
        `max_tokens_per_micro_batch`), normalised by the whole batch's denominators; DeepSpeed
        averages the gradients."""
        shards, scores = fetch(share.shards), fetch(share.scores)
        batch: RolloutShard = concat_shards(shards)
        teacher: TeacherScores = concat_scores(scores, batch.response_ids_NR.shape[1])
        algo, kd, cfg = self.algo, self.algo.kd, self.cfg
        mask_NR = batch.response_mask_NR()
        adv_N = group_advantages(batch.rewards_N, batch.group_size, algo.advantage)
        kd_mask_N = kd_sequence_mask(batch.rewards_N, batch.group_size, kd.mask)
        main = micro_batches(batch.prompt_len_N + batch.response_len_N, cfg.micro_batch_size,
                             cfg.max_tokens_per_micro_batch)
        rehearsal = self._rehearsal_batches(share.rehearsal_start) if self.rehearsal is not None else None
        own = len(main) + (len(rehearsal[2]) if rehearsal else 0)
        count = self._agreed_count(own)
        m = StepMetrics()
        skipped_before = self.engine.skipped_steps
        for idx in main:
            seqs = forward_fields(batch, idx)
            r = seqs[2].shape[1]
            dev = lambda t: t[idx, :r].to(self.device)  # noqa: E731  a [N, R, ...] tensor's rows and width
            mask = dev(mask_NR)
            topk = dict(topk_ids_NRK=dev(teacher.topk_ids_NRK), teacher_topk_logp_NRK1=dev(teacher.topk_logp_NRK1)) \
                if kd.estimator == "topk" else {}
            logp, entropy, kd_values = self._forward(seqs, with_entropy=True, **topk)
            current = logp.detach()
            sampler = dev(batch.sampler_logp_NR)
            # the behaviour policy: pi_theta itself when every sample is fresh (one update per
            # batch), the sampler's log-probs mu when samples may be stale (algorithm.max_staleness):
            # then GRPO gets the clipped ratio pi_theta / mu and the teacher term sg(pi_theta / mu)
            old_logp = sampler if algo.max_staleness > 0 else current
            is_w = truncated_is_weights(current, sampler, algo.tis_cap) if algo.tis_cap > 0 else None
            loss, lm = kdrl_loss(
                logp, old_logp, adv_N[idx].to(self.device), mask, dev(teacher.logp_NR), share.kd_coef,
                estimator=kd.estimator, kd_values=kd_values, kd_seq_mask=kd_mask_N[idx].to(self.device),
                kd_norm=kd.norm, clip_low=algo.clip_low, clip_high=algo.clip_high, aggregation=algo.aggregation,
                is_weights=is_w, norm_len=self.max_new_tokens, pg_denominator=share.pg_denominator,
                kd_denominator=share.kd_denominator, pg_coef=algo.pg_coef)
            m.nonfinite += self._backward(loss)
            tokens = float(mask.sum())
            m.tokens += tokens
            m.policy_loss += float(lm["policy_loss"])
            m.kd_loss += float(lm["kd_loss"])
            m.kd_k1_sum += float(lm["kd_k1_sum"])
            m.kd_tokens += float(lm["kd_tokens"])
            m.clip_sum += float(lm["clip_frac"]) * tokens
            m.entropy_sum += float((entropy * mask).sum())
            with torch.no_grad():
                delta = (sampler - current) * mask
                m.mismatch_k3_sum += float(((torch.expm1(-delta) + delta) * mask).sum())
                m.mismatch_max = max(m.mismatch_max, float(((sampler.exp() - current.exp()).abs() * mask).max()))
                if is_w is not None:
                    m.tis_weight_sum += float((is_w * mask).sum())
        if rehearsal:
            m.rehearsal_loss, bad = self._rehearsal_backward(*rehearsal)
            m.nonfinite += bad
        for _ in range(count - own):
            self._zero_pass()
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()  # None when DeepSpeed did not compute it
        m.grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        m.skipped = m.nonfinite > 0 or self.engine.skipped_steps > skipped_before
        return m

    def _rehearsal_batches(self, start: int) -> tuple:
        """This rank's part of the step's chunk of cached reference samples, in micro-batches:
        (rows, the chunk's token count, index sets; none when the rank's part is empty)."""
        reh = self.algo.rehearsal
        rows = self.rehearsal.take(start, reh.samples_per_step)
        total = max(float(rows.response_len_N.sum()), 1.0)
        per_rank = math.ceil(reh.samples_per_step / self.world_size)
        lo = min(self.rank * per_rank, reh.samples_per_step)
        mine = torch.arange(lo, min(lo + per_rank, reh.samples_per_step))
        lengths = rows.prompt_len_N[mine] + rows.response_len_N[mine]
        sets = micro_batches(lengths, self.cfg.micro_batch_size, self.cfg.max_tokens_per_micro_batch)
        return rows, total, [mine[i] for i in sets]

    def _rehearsal_backward(self, rows, total: float, batches: list) -> tuple[float, int]:
        """DPH-RL: coef x the f-divergence to the initial policy, token mean over the step's
        chunk of cached reference samples (split over ranks and micro-batches)."""
        reh = self.algo.rehearsal
        value, bad = 0.0, 0
        for idx in batches:
            fields = forward_fields(rows, idx)
            r = fields[2].shape[1]
            mask = rows.response_mask_NR()[idx, :r].to(self.device)
            logp, _, _ = self._forward(fields)
            loss = rehearsal_loss(logp, rows.ref_logp_NR[idx, :r].to(self.device), mask, reh.divergence, reh.alpha,
                                  aggregation="token_mean") * (float(mask.sum()) / total)
            value += float(loss)
            bad += self._backward(reh.coef * loss)
        return value, bad

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

    def training_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the optimizer, whole: {"NAME/master" | "NAME/exp_avg" |
        "NAME/exp_avg_sq": tensor} and {"step": tensor} on rank 0 (others: empty; every rank calls)."""
        out = {f"{name}/{k}": v for name, tensors in learner_state.iter_full_tensors(self.engine, self.model)
               for k, v in tensors.items()}
        return {**out, "step": torch.tensor(learner_state.step_count(self.engine))} if self.rank == 0 else {}

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

    def sync_payload(self) -> bytes | None:
        """The weights for the rollout engines, as `weight_sync.ObjectStoreSync` moves them
        (rank 0; every rank calls, since ZeRO-3 gathers)."""
        weights = self.full_state_dict()
        return pack_weights(weights) if self.rank == 0 else None

    @torch.no_grad()
    def sequence_logprobs(self, token_ids: list[int]) -> list[float]:
        """log pi_theta (temperature 1) of tokens 1..end of a fixed sequence (to check weight
        syncs; under ZeRO-3 every rank must call)."""
        ids = torch.tensor([token_ids], device=self.device)
        logits = self.model(input_ids=ids).logits[0, :-1, :self.vocab_size].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1).tolist()
