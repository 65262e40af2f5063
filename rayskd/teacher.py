"""Teacher scorer: a plain class over a frozen causal LM. One forward pass over prompt +
response returns the teacher's log-prob of every sampled token (and, when the estimator needs
it, the top-k distribution, ids drawn from it with importance weights, or the final hidden
states), with a chunked log-softmax (not vLLM prompt_logprobs, which measured 1.7x slower,
7.9x with top-20)."""
from __future__ import annotations

import os

import torch

from .actor_logs import log_to_file
from .batch import RolloutShard, TeacherScores, forward_fields, micro_batches, pad_rows, select_rows
from .config import TeacherConfig
from .losses import hidden_logprobs, hidden_topk_logprobs
from .losses.sparse import hidden_sampled_logprobs, row_uniforms
from .modeling import SCORING_CHUNK, load_causal_lm, response_hidden, vocab_limit


def teacher_dtype(name: str, device: str) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    native_bf16 = device == "cuda" or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native_bf16 else torch.float32


def finite_scores(logp_NR: torch.Tensor, top_ids, top_lps, mask_NR: torch.Tensor, worker: int,
                  sampled: tuple | None = None, hidden: torch.Tensor | None = None) -> TeacherScores:
    """The scores of a shard, with every sequence that has a non-finite value on a response token
    (a teacher with inf or NaN weights, an overflow) counted in `nonfinite_N` and zeroed: it is
    not trained on (learner.share_micro_batches), and one bad sequence never spoils a batch.
    `sampled`: (ids, log-probs, log weights) of a sampled payload; `hidden`: the hidden states.
    Zeroes in place (score's own tensors)."""
    per_position = [t for t in (top_lps, *(sampled[1:] if sampled else ()), hidden) if t is not None]
    bad = ~torch.isfinite(logp_NR) & (mask_NR > 0)
    for t in per_position:
        bad |= ~torch.isfinite(t).all(-1) & (mask_NR > 0)
    nonfinite_N = bad.sum(-1)
    rows = nonfinite_N > 0
    logp_NR = torch.where(rows[:, None], 0.0, logp_NR) * mask_NR
    if bool(rows.any()):
        for t in per_position:
            t[rows] = 0.0
    ids, lps, logw = sampled if sampled else (None, None, None)
    return TeacherScores(logp_NR=logp_NR, topk_ids_NRK=top_ids, topk_logp_NRK1=top_lps, sample_ids_NRS=ids,
                         sample_logp_NRS=lps, sample_logw_NRS=logw, hidden_NRH=hidden,
                         nonfinite_N=nonfinite_N if bool(rows.any()) else None, worker=worker)


def _row_generator(seed: int, row: int) -> torch.Generator:
    """The generator of one row's draws in the sampling loop (judge, mix)."""
    return torch.Generator().manual_seed((seed + 1_000_003 * row) % (2 ** 62))


def _draw(logits_V: torch.Tensor, g: torch.Generator) -> int:
    return int(torch.multinomial(torch.softmax(logits_V.double().cpu(), -1), 1, generator=g))


class TeacherScorer:
    """One rank of a teacher worker. With teacher.tensor_parallel_size = t > 1, t ranks (one
    per device) hold one teacher sharded by transformers' tensor-parallel plan over a process
    group of their own; each scoring call goes to all t with the same shard, and rank 0's
    result is the worker's. The LM head is kept whole on every rank (the chunked log-softmax
    reads it outside the model's forward)."""

    def __init__(self, model_path: str, cfg: TeacherConfig, tokenizer_len: int, *, rank: int = 0, worker: int = 0,
                 master_addr: str | None = None, master_port: int | None = None, teacher: int = 0):
        log_to_file()  # in an actor group with a log directory: output to RUN_DIR/logs/
        self.cfg, self.rank, self.worker, self.teacher = cfg, rank, worker, teacher
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = teacher_dtype(cfg.dtype, self.device)
        tp = cfg.tensor_parallel_size
        if tp > 1:
            from torch.distributed.device_mesh import init_device_mesh

            from .distributed import init_process_group

            os.environ.update(RANK=str(rank), WORLD_SIZE=str(tp), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
            init_process_group("nccl" if self.device == "cuda" else "gloo", master_addr, master_port, rank, tp)
            mesh = init_device_mesh(self.device, (tp,))
            self.model = load_causal_lm(model_path, dtype, self.device, tp_plan="auto", device_mesh=mesh)
        else:
            self.model = load_causal_lm(model_path, dtype, self.device)
        self.model.eval().requires_grad_(False)
        head = self.model.get_output_embeddings().weight
        self.head = head.full_tensor() if hasattr(head, "full_tensor") else head  # a DTensor under TP: gathered once
        self.vocab_size = vocab_limit(tokenizer_len, self.model)

    def ready(self) -> bool:
        return True

    @torch.no_grad()
    def judge(self, prefixes: list[list[int]], proposals: list[list[int]], top_k: int,
              seed: int) -> list[tuple[int, int]] | None:
        """Speculative KD's verdict on each proposal (speculative.py): how many of its tokens,
        from the first, lie in this teacher's top-`top_k` at their position (at
        teacher.temperature), and a token drawn from its distribution at the first that does not
        (-1 when all do). The draw is seeded by `seed` and the row."""
        logits = self._proposal_logits(prefixes, proposals)
        top = logits.topk(min(top_k, self.vocab_size), dim=-1).indices.cpu()  # [N, R, K]
        out = []
        for i, proposal in enumerate(proposals):
            inside = [int(t) in set(top[i, j].tolist()) for j, t in enumerate(proposal)]
            taken = inside.index(False) if False in inside else len(proposal)
            if taken == len(proposal):
                out.append((taken, -1))
                continue
            out.append((taken, _draw(logits[i, taken], _row_generator(seed, i))))
        return out if self.rank == 0 else None

    @torch.no_grad()
    def mix(self, prefixes: list[list[int]], proposals: list[list[int]], alpha: float,
            seed: int) -> list[tuple[int, int]] | None:
        """MiniLLM's teacher-mixed sampling, one token per row (speculative.py): with probability
        `alpha` a token drawn from this teacher's distribution after the prefix replaces the
        student's proposed one, (0, draw); else the proposal stands, (1, -1). Seeded by `seed`
        and the row: the choice and the draw are a draw from alpha pi_T + (1 - alpha) pi_theta."""
        logits = self._proposal_logits(prefixes, [p[:1] or [0] for p in proposals])[:, 0]
        out = []
        for i, proposal in enumerate(proposals):
            g = _row_generator(seed, i)
            if float(torch.rand((), generator=g, dtype=torch.float64)) >= alpha and proposal:
                out.append((1, -1))
                continue
            out.append((0, _draw(logits[i], g)))
        return out if self.rank == 0 else None

    def _proposal_logits(self, prefixes: list[list[int]], proposals: list[list[int]]) -> torch.Tensor:
        """This teacher's logits [N, R, V] (at teacher.temperature, the tokenizer's rows) at the
        positions that predict each proposed token after its prefix."""
        fields = (pad_rows(prefixes), torch.tensor([len(p) for p in prefixes]),
                  pad_rows(proposals, width=max([len(p) for p in proposals] + [1])),
                  torch.tensor([len(p) for p in proposals]))
        h = response_hidden(self.model, *fields, self.device)
        return (h.float() @ self.head[:self.vocab_size].float().T) / self.cfg.temperature

    @torch.no_grad()
    def score(self, shard: RolloutShard, rows: list[int] | None = None) -> TeacherScores | None:
        """Scores in micro-batches (of `micro_batch_size` rows, or by `max_tokens_per_batch`
        length-grouped), each cut to its own widths and written back in the shard's order
        (rank 0 of a tensor-parallel worker returns them; the others None). `rows`: only those
        sequences of the shard (the ones routed to this teacher), returned in that order."""
        if rows is not None:
            scores = self.score(select_rows(shard, torch.tensor(rows, dtype=torch.long)))
            if scores is not None:
                scores.rows_N = torch.tensor(rows, dtype=torch.long)
            return scores
        N, R = shard.response_ids_NR.shape
        k, s = self.cfg.top_k, self.cfg.sparse_samples
        logp = torch.zeros(N, R, dtype=torch.float32)
        kk = min(k, self.vocab_size)
        # ids as int32 (a third less payload than int64 for top-k; the learner widens them)
        top_ids = torch.zeros(N, R, kk, dtype=torch.int32) if k > 0 else None
        top_lps = torch.zeros(N, R, kk + 1, dtype=torch.float32) if k > 0 else None
        sampled = (torch.zeros(N, R, s, dtype=torch.int32), torch.zeros(N, R, s), torch.zeros(N, R, s)) if s > 0 else None
        hidden = None  # [N, R, H] in the teacher's dtype (teacher.send_hidden)
        lengths = shard.prompt_len_N + shard.response_len_N
        for idx in micro_batches(lengths, self.cfg.micro_batch_size, self.cfg.max_tokens_per_batch):
            fields = forward_fields(shard, idx)
            r = fields[2].shape[1]
            h = response_hidden(self.model, *fields, self.device)
            ids = fields[2].to(self.device)
            if k > 0:
                lp, top_i, top_v = hidden_topk_logprobs(h, self.head, ids, k, self.cfg.temperature, SCORING_CHUNK,
                                                        self.vocab_size)
                top_ids[idx, :r] = top_i.to(torch.int32).cpu()
                top_lps[idx, :r] = top_v.float().cpu()
            elif s > 0:
                prompts, plens, responses, rlens = fields
                rows = [p[:pl].tolist() + x[:rl].tolist() for p, pl, x, rl in zip(prompts, plens, responses, rlens)]
                uniforms = row_uniforms(rows, rlens.tolist(), r, s)
                lp, *drawn = hidden_sampled_logprobs(h, self.head, ids, uniforms, self.cfg.temperature,
                                                     self.cfg.sparse_temperature, SCORING_CHUNK, self.vocab_size)
                for out, value in zip(sampled, drawn):
                    out[idx, :r] = value.to(out.dtype).cpu()
            else:
                lp = hidden_logprobs(h, self.head, ids, self.cfg.temperature, SCORING_CHUNK, self.vocab_size)
                if self.cfg.send_hidden:
                    if hidden is None:
                        hidden = torch.zeros(N, R, h.shape[-1], dtype=h.dtype)
                    hidden[idx, :r] = h.cpu()
            logp[idx, :r] = lp.float().cpu()
        if self.rank != 0:
            return None
        scores = finite_scores(logp, top_ids, top_lps, shard.response_mask_NR(), self.worker, sampled, hidden)
        scores.teacher = self.teacher
        return scores
