"""One typed configuration: YAML + `key=value` overrides -> validated, read-only dataclasses.

`load_config` raises `ConfigError` (one line, naming the key) for unknown keys, wrong types
and impossible combinations; the CLI turns it into exit status 2 before anything starts.
Components receive only their own (frozen) section.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .losses import (
    ADVANTAGES, AGGREGATIONS, DIVERGENCES, GENERATORS, KD_MASKS, KD_NORMS, SCHEDULES, TEACHER_ESTIMATORS,
)
from .rewards import BUILTIN as BUILTIN_REWARDS
from .weight_sync import TRANSPORTS

class ConfigError(ValueError):
    """A configuration problem, reported as one line: `<key>: <what is wrong>`."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/rayskd"
    steps: int = 20
    seed: int = 0
    checkpoint_every: int = 0  # 0: only at the end (and on SIGTERM)
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: evaluate only before and after training
    eval_max_prompts: int = 0  # 0: the whole eval split
    # each evaluation: greedy accuracy, and pass@k for each k from eval_samples sampled
    # responses per problem at the rollout settings (0: greedy only); in RUN_DIR/eval.jsonl
    eval_samples: int = 8
    eval_k: Tuple[int, ...] = (1, 4, 8)
    # > 0: the evaluations between the first and the last draw this many samples per problem (a
    # learning curve's cheaper points; pass@k for the k of eval_k it allows); 0: eval_samples
    eval_curve_samples: int = 0
    # false: no evaluation before step 1 (a sweep that evaluated the same initial student once)
    eval_before: bool = True
    tensorboard: bool = True  # event files in RUN_DIR/tensorboard
    wandb_project: Optional[str] = None  # also log to Weights & Biases (WANDB_MODE=offline works)
    resume: str = "never"  # never | auto
    # a resume checks that the training data and tokenizer are what the checkpoint was trained on
    # (exit 2 naming what changed); true: train on the changed data, its pass starting anew
    allow_data_change: bool = False
    # a stop the driver survives (a learner or node lost, an actor that keeps failing) is followed
    # by an automatic resume from the newest intact checkpoint, in the same process, at most this
    # many times within an hour (0: none); then the run stops with the command to resume it
    max_restarts: int = 2


@dataclass(frozen=True)
class DataConfig:
    train_path: str = MISSING
    eval_path: Optional[str] = None
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    max_prompt_tokens: int = 512
    shuffle: bool = True
    # a prompt of {role, content} messages always goes through the student's chat template;
    # chat_template=true sends text prompts through it too, as one user message
    chat_template: bool = False
    system_prompt: Optional[str] = None  # put first when a conversation has no system message


@dataclass(frozen=True)
class RewardConfig:
    name: str = "exact_match"  # a built-in reward: exact_match | math | split_sum (the split demo)
    function: Optional[str] = None  # or "module:function" taking (prompt, completion, answer) -> float
    timeout_s: float = 10.0
    # cap on the reward process's data memory (RLIMIT_DATA); a sample that overruns it
    # scores 0 and is counted, like one that raises (0: no cap)
    max_memory_mb: int = 4096


@dataclass(frozen=True)
class StudentConfig:
    path: str = MISSING


@dataclass(frozen=True)
class TeacherGenerationConfig:
    """vLLM engines serving the frozen teacher, for sequences the teacher samples
    (algorithm.gkd.off_policy=teacher); they sample with the rollout settings."""
    num_workers: int = 0  # 0: the teacher does not generate
    gpus_per_worker: float = 0.0
    tensor_parallel_size: int = 1


@dataclass(frozen=True)
class TeacherConfig:
    path: str = MISSING
    num_workers: int = 1
    # GPUs per teacher worker: > 1 only with tensor_parallel_size equal to it (one rank per GPU)
    gpus_per_worker: float = 0.0
    # > 1: each teacher worker is this many ranks, the model sharded over them by transformers'
    # tensor-parallel plan (one device each: NCCL on GPUs, gloo on CPU)
    tensor_parallel_size: int = 1
    # custom Ray resources per actor, e.g. a node label (0: none of it, to unpin a role on a resume)
    resources: Dict[str, float] = field(default_factory=dict)
    top_k: int = 0  # > 0: also return the teacher's top-k distribution (estimator=topk)
    # > 0: also return this many ids per position drawn from the teacher's distribution at
    # sparse_temperature, with importance weights (estimator=sparse; losses/sparse.py)
    sparse_samples: int = 0
    sparse_temperature: float = 1.0
    # send the final hidden states (H values per token, the teacher's dtype) instead: the learner
    # holds the teacher's LM head and takes the divergence over the whole vocabulary (estimator=full)
    send_hidden: bool = False
    # the teacher-hacking monitor (arXiv 2502.02671): a golden model (path or model id), scored
    # at each evaluation on the student's sampled evaluation responses beside this teacher; one
    # worker with the teacher's settings (docs/algorithms.md, "Teacher hacking")
    golden_path: Optional[str] = None
    # several teachers (docs/algorithms.md, "Several teachers"): more teachers' paths (or model
    # ids), each its own pool of num_workers workers with these settings; teacher i + 1 is others[i]
    others: List[str] = field(default_factory=list)
    # route: each prompt's data field `route_field` names its one teacher (by index or by name);
    # ensemble: every sequence is scored by all, the target the mixture sum_i w_i pi_i
    combine: str = "route"
    route_field: str = ""
    names: List[str] = field(default_factory=list)  # a name per teacher, for metrics (default 0, 1, ...)
    # per-teacher coefficient (default 1 each): route: on the teacher term of the prompts it
    # scores; ensemble: the mixture weights w_i, normalised to sum 1
    coefs: List[float] = field(default_factory=list)
    generation: TeacherGenerationConfig = field(default_factory=TeacherGenerationConfig)
    # the teacher scores the student's tokens, rendered with the student's chat template: a
    # teacher whose own template renders a conversation differently is refused unless this is set
    allow_template_mismatch: bool = False
    micro_batch_size: int = 16
    # > 0: micro-batches by a token budget instead of micro_batch_size rows: sequences grouped
    # by length, rows x longest (prompt + response) <= this (see batch.micro_batches)
    max_tokens_per_batch: int = 0
    temperature: float = 1.0  # the teacher is scored at this temperature
    # weights and activations of the frozen teacher (log-softmax is fp32 either way); auto:
    # bfloat16 on GPU, and on CPU where it has native bf16 matrix units (2.8x fp32 measured on
    # AVX512-BF16), else float32
    dtype: str = "auto"


@dataclass(frozen=True)
class RolloutConfig:
    num_workers: int = 1
    # GPUs per rollout engine: > 1 only with tensor_parallel_size equal to it
    gpus_per_worker: float = 0.0
    # > 1: each engine is vLLM over this many devices (its own worker processes; on CPU each
    # gets its share of the cores, VLLM_CPU_OMP_THREADS_BIND)
    tensor_parallel_size: int = 1
    resources: Dict[str, float] = field(default_factory=dict)  # custom Ray resources per actor, e.g. a node label
    samples_per_prompt: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0  # only 1.0: see validate()
    top_k: int = -1  # only -1 (off): see validate()
    # the share of its GPU's memory an engine takes for weights and KV cache (vLLM's
    # gpu_memory_utilization); unset: 0.9 x its GPU share (gpus_per_worker, at most 1)
    gpu_memory_utilization: Optional[float] = None
    cpu_kv_cache_gb: int = 1
    sync_timeout_s: float = 120.0
    # a rollout worker that fails (its process or its vLLM engine dies) is restarted by Ray, given
    # the current weights and its work again; failing more than this many times within 10 minutes
    # stops the run
    max_failures: int = 3
    # how the learner's weights reach the engines (weight_sync.py): collective (a process group of
    # learner rank 0 and every engine worker: gloo on CPU, NCCL on GPU), object_store (through
    # Ray's object store), or auto: collective on GPUs, except object_store where an engine may
    # share learner rank 0's GPU (NCCL cannot join two ranks on one device), and on CPU (faster there)
    weight_transport: str = "auto"
    # engines that share their GPUs with the learners sleep while the learners train (vLLM's sleep
    # mode: weights and KV cache released) and wake for generation, the new weights loaded after
    # waking. Unset: when the engines' and the learners' GPU shares are both fractions (they can
    # share a GPU). A sleeping engine cannot generate ahead: it needs algorithm.max_staleness=0.
    # No effect on CPU.
    sleep_while_training: Optional[bool] = None
    # vLLM without CUDA graphs or torch.compile: faster to start, slower to generate. Unset: on
    # CPU (where compiling buys nothing measurable), not on GPU
    enforce_eager: Optional[bool] = None
    weight_bucket_mb: int = 512  # the most a push moves in one message (ZeRO-3 gathers this much at a time)
    # sample exactly max_new_tokens: an end-of-sequence token is an ordinary token (the
    # sampling distribution is unchanged, so the learner's log-probs still match). For benchmarks.
    ignore_eos: bool = False
    # generation also ends at these strings (the tokens that produced one are kept, and the
    # response counts as terminated, not truncated); end-of-sequence ids come from the
    # student's generation_config.json (all of them: chat models often have several)
    stop: Tuple[str, ...] = ()
    # each step's prompts go out as requests of this many prompts, spread over the engines,
    # each scored by the first free teacher as soon as it is generated (0: as few requests as
    # the engines and learner ranks allow; see requests_per_step). A call's samples are seeded by
    # its prompts: fix this to keep a resume on another learner rank count sampling the same
    prompts_per_request: int = 0


@dataclass(frozen=True)
class LearnerConfig:
    world_size: int = 1
    gpus_per_worker: float = 0.0
    resources: Dict[str, float] = field(default_factory=dict)  # custom Ray resources per actor, e.g. a node label
    zero_stage: int = 2
    lr: float = 1e-6
    warmup_steps: int = 0  # linear warm-up of the learning rate over this many updates
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # rows per micro-batch (the last of a step may hold fewer): one optimizer update per step either way
    micro_batch_size: int = 4
    max_tokens_per_micro_batch: int = 0  # > 0: micro-batches by token budget, as teacher.max_tokens_per_batch
    bf16: bool = False
    logprob_chunk: int = 1024
    # a diagnostic, two more backward passes per micro-batch: log the GRPO and teacher terms' own
    # gradient norms and their cosine (pg_grad_norm, kd_grad_norm, term_grad_cosine); ZeRO 0-2
    log_term_grads: bool = False


@dataclass(frozen=True)
class TaidConfig:
    """TAID's schedule of t (divergence taid; docs/algorithms.md, "TAID"): from t_start towards
    t_end, at least linearly over run.steps, faster while the term falls fast (the paper's defaults)."""
    t_start: float = 0.4
    t_end: float = 1.0
    alpha: float = 5e-4  # step size of the adaptive growth
    beta: float = 0.99  # momentum of the term's relative decrease


@dataclass(frozen=True)
class MiniLLMConfig:
    """MiniLLM's reward-to-go (estimator minillm / minillm_topk; docs/algorithms.md, "MiniLLM"):
    the authors' code's discount and length normalisation. gamma 1 without normalisation is the
    exact gradient of the sequence-level reverse KL; these trade that for less variance."""
    gamma: float = 0.95
    length_norm: bool = True
    # > 0: MiniLLM's teacher-mixed sampling: each token drawn from mix_alpha pi_T + (1 - mix_alpha)
    # pi_theta (the teacher in the sampling loop, speculative.py), the teacher term importance-
    # weighted by pi_theta / that mixture (the paper's 0.2)
    mix_alpha: float = 0.0


@dataclass(frozen=True)
class KDConfig:
    """The teacher term (docs/algorithms.md, "The teacher term")."""
    divergence: str = "reverse_kl"  # a name of losses.DIVERGENCES (the distribution estimators)
    # a name of losses.TEACHER_ESTIMATORS: k2 | k3 | k1_reward | topk | minillm | minillm_topk
    estimator: str = "k2"
    coef: float = 0.1
    schedule: str = "constant"  # constant | linear
    coef_min: float = 0.0
    decay: float = 0.0  # per step, for schedule=linear
    # which responses get the teacher term: all | incorrect_only (not solved: reward < 1) |
    # group_unsolved (no response of the group solved)
    mask: str = "all"
    norm: str = "masked"  # masked | all: the normaliser of the masked KD term
    beta: float = 0.5  # generalized_jsd
    skew: float = 0.1  # skew_forward_kl / skew_reverse_kl
    # a sampled-token estimator's importance weight is sg(min(pi_theta / mu, is_cap)): truncated,
    # as TIS truncates the GRPO term's (one rare token with mu << pi_theta would dominate the step)
    is_cap: float = 2.0
    taid: TaidConfig = field(default_factory=TaidConfig)
    minillm: MiniLLMConfig = field(default_factory=MiniLLMConfig)


@dataclass(frozen=True)
class RehearsalConfig:
    divergence: str = "forward_kl"
    coef: float = 0.0  # 0: off
    alpha: float = 0.5
    data_path: Optional[str] = None
    samples_per_step: int = 8
    presample_samples: int = 8  # rayskd presample: responses per prompt from the initial student
    presample_min_correct: int = 8  # keep prompts solved at least this many times


@dataclass(frozen=True)
class GKDConfig:
    """Sequences of other origins (docs/algorithms.md, "Sequences of other origins")."""
    # GKD (arXiv 2306.13649): each prompt's sequences are the student's own samples with
    # probability lmbda (drawn per prompt from the run seed and the step: the same on a resume),
    # else off-policy ones; 1: all on-policy
    lmbda: float = 1.0
    # where the off-policy sequences come from: dataset, the row's reference response (its answer
    # column, the text the reward judges), G copies per prompt; teacher, G samples of the teacher
    # (teacher.generation's engines, the rollout settings). They get the teacher term only
    off_policy: str = "dataset"


@dataclass(frozen=True)
class DistiLLMConfig:
    """DistiLLM's adaptive off-policy reuse (arXiv 2402.03898; rayskd/replay.py, docs/algorithms.md):
    each prompt's sequences are the dataset's reference response with probability 1 - t, else the
    student's, fresh or (once the buffer is full, with probability step / run.steps) replayed.
    t rises by raise_by when the validation loss (the student's token cross-entropy on the
    evaluation's reference responses, at every evaluation) rose by loss_eps. The authors' values."""
    capacity: int = 0  # > 0: on; the replay buffer's size in groups (a prompt and its G samples)
    init_threshold: float = 0.0
    raise_by: float = 0.1
    loss_eps: float = 0.1


@dataclass(frozen=True)
class SKDConfig:
    """Speculative KD (arXiv 2410.11325; docs/algorithms.md, "Speculative KD")."""
    # > 0: every sequence is the student's proposals, block by block, each token outside the
    # teacher's top-K replaced by the teacher's draw (and the block cut there)
    top_k: int = 0
    block: int = 4  # tokens the student proposes per round


@dataclass(frozen=True)
class AlgorithmConfig:
    prompts_per_step: int = 8
    advantage: str = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    aggregation: str = "token_mean"
    # how the GRPO term corrects for sampling by mu (the engine: stale weights, engine/learner
    # mismatch): 0: the clipped ratio is taken against mu; C > 0: the ratio against the learner's
    # own log-probs, times the truncated weight sg(min(pi_theta / mu, C)) (TIS). Either applies the
    # correction once, whatever max_staleness is (docs/algorithms.md, "Off-policy corrections")
    tis_cap: float = 0.0
    pg_coef: float = 1.0  # weight of the GRPO term: 0 gives on-policy distillation only
    # k >= 1: the rollouts of the next k updates are generated while the learner trains, and no
    # sample is more than k weight versions old; 0: each step samples with the newest weights.
    # The losses correct either way: the sampler's log-probs are always the behaviour policy
    max_staleness: int = 0
    kd: KDConfig = field(default_factory=KDConfig)
    rehearsal: RehearsalConfig = field(default_factory=RehearsalConfig)
    gkd: GKDConfig = field(default_factory=GKDConfig)
    distillm: DistiLLMConfig = field(default_factory=DistiLLMConfig)
    skd: SKDConfig = field(default_factory=SKDConfig)


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)


def engine_memory_fraction(rollout: RolloutConfig) -> float:
    """vLLM's gpu_memory_utilization for an engine: as set, or 0.9 x its GPU share."""
    if rollout.gpu_memory_utilization is not None:
        return rollout.gpu_memory_utilization
    return 0.9 * min(rollout.gpus_per_worker, 1.0) if rollout.gpus_per_worker > 0 else 0.9


def engines_sleep(cfg: Config) -> bool:
    """Whether the engines sleep while the learners train (rollout.sleep_while_training, resolved)."""
    if cfg.rollout.sleep_while_training is not None:
        return cfg.rollout.sleep_while_training
    return 0 < cfg.rollout.gpus_per_worker < 1 and 0 < cfg.learner.gpus_per_worker < 1


def gpus_asked(cfg: Config) -> float:
    """The GPUs a run's actors ask Ray for, all roles together."""
    teachers = (1 + len(cfg.teacher.others)) * cfg.teacher.num_workers
    gen = cfg.teacher.generation
    return (cfg.rollout.num_workers * cfg.rollout.gpus_per_worker + teachers * cfg.teacher.gpus_per_worker
            + gen.num_workers * gen.gpus_per_worker
            + cfg.learner.world_size * cfg.learner.gpus_per_worker)


def requests_per_step(cfg: Config) -> int:
    """How many generation requests one step's prompts are split into: each learner rank
    trains whole requests, so the count is a multiple of learner.world_size; automatic
    (prompts_per_request 0): the smallest such count that gives every engine one (0 if none
    divides prompts_per_step)."""
    prompts, ranks = cfg.algorithm.prompts_per_step, cfg.learner.world_size
    if cfg.rollout.prompts_per_request:
        return prompts // cfg.rollout.prompts_per_request
    # the teacher's samples (or replayed groups) are requests of their own: at least 2
    least = max(min(cfg.rollout.num_workers, prompts),
                2 if teacher_generates(cfg) or cfg.algorithm.distillm.capacity else 1)
    for count in range(ranks, prompts + 1, ranks):
        if count >= least and prompts % count == 0:
            return count
    return 0


def teacher_generates(cfg: Config) -> bool:
    """Whether some sequences are the teacher's samples (GKD with off_policy=teacher)."""
    return cfg.algorithm.gkd.lmbda < 1 and cfg.algorithm.gkd.off_policy == "teacher"


MODEL_KEYS = ("student.path", "teacher.path", "teacher.golden_path")
MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_model_id(value: str) -> bool:
    """A Hugging Face model id (`org/name`) rather than a path: it looks like one and no such
    file or directory exists here. Resolved through the Hugging Face cache (preflight)."""
    return bool(MODEL_ID.match(value)) and not os.path.exists(os.path.expanduser(value))


PATH_KEYS = ("run.output_dir", "data.train_path", "data.eval_path", "student.path", "teacher.path",
             "teacher.golden_path", "algorithm.rehearsal.data_path")


def first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Load YAML (optional) + dotted `key=value` overrides into a validated, frozen Config.
    Relative paths are made absolute against the current directory."""
    try:
        layers = [OmegaConf.structured(Config)]
        if path is not None:
            if not os.path.isfile(path):
                raise ConfigError("", f"config file not found: {path}")
            layers.append(OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(item, "an override must look like key=value")
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(OmegaConf.merge(*layers))
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        msg = getattr(e, "msg", None) or first_line(e)
        raise ConfigError(key, first_line(Exception(msg))) from None
    except Exception as e:  # YAML syntax errors and the like
        mark = getattr(e, "problem_mark", None)
        if mark is not None:  # where in the file: line and column, 1-based
            what = getattr(e, "problem", None) or first_line(e)
            raise ConfigError(path or "", f"line {mark.line + 1}, column {mark.column + 1}: {what}") from None
        raise ConfigError(path or "", first_line(e)) from None
    for key in PATH_KEYS:
        value = get_key(cfg, key)
        if value and not (key in MODEL_KEYS and is_model_id(value)):
            cfg = _replace(cfg, key, os.path.abspath(os.path.expanduser(value)))
    others = [v if is_model_id(v) else os.path.abspath(os.path.expanduser(v)) for v in cfg.teacher.others]
    cfg = _replace(cfg, "teacher.others", others)
    validate(cfg)
    return cfg


def get_key(cfg, key: str):
    """The value at a dotted key of a config."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _replace(cfg, key: str, value):
    """A copy of the frozen dataclass tree with the dotted `key` set to `value`."""
    head, _, rest = key.partition(".")
    new = _replace(getattr(cfg, head), rest, value) if rest else value
    return dataclasses.replace(cfg, **{head: new})


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(choices)}")


def _named(key: str, value: str, table: dict, about) -> None:
    """`value` must name an entry of `table` (the implementations, losses/): the message lists
    each name with one line on what it is."""
    if value not in table:
        listed = "; ".join(f"{name} ({about(entry)})" for name, entry in table.items())
        raise ConfigError(key, f"{value!r} is not one of: {listed}")


def _first_line(fn) -> str:
    return (fn.__doc__ or "").strip().splitlines()[0].rstrip(".") if fn.__doc__ else fn.__name__


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _gpus(key: str, value: float) -> None:
    _check(value >= 0, key, f"must be >= 0, got {value}")
    _check(value <= 1 or float(value).is_integer(), key, f"above 1 must be a whole number of GPUs, got {value}")


def teacher_paths(cfg: Config) -> list[str]:
    """Every teacher's path: teacher.path, then teacher.others."""
    return [cfg.teacher.path, *cfg.teacher.others]


def teacher_names(cfg: Config) -> list[str]:
    return list(cfg.teacher.names) or [str(i) for i in range(1 + len(cfg.teacher.others))]


def teacher_coefs(cfg: Config) -> list[float]:
    """Per-teacher coefficients; for an ensemble the mixture weights, normalised."""
    coefs = list(cfg.teacher.coefs) or [1.0] * (1 + len(cfg.teacher.others))
    return [c / sum(coefs) for c in coefs] if cfg.teacher.combine == "ensemble" else coefs


def _check_teachers(teacher: TeacherConfig, kd) -> None:
    count = 1 + len(teacher.others)
    _choice("teacher.combine", teacher.combine, ("route", "ensemble"))
    for key, values in (("teacher.names", teacher.names), ("teacher.coefs", teacher.coefs)):
        _check(not values or len(values) == count, key,
               f"one per teacher (teacher.path and {len(teacher.others)} in teacher.others): {count}, got {len(values)}")
    _check(len(set(teacher.names)) == len(teacher.names), "teacher.names", "must be distinct")
    _check(all(c >= 0 for c in teacher.coefs), "teacher.coefs", "must be >= 0")
    if count == 1:
        _check(not teacher.route_field, "teacher.route_field",
               "names the data field that picks one of several teachers: list the others in teacher.others")
        return
    _check(not teacher.send_hidden, "teacher.send_hidden",
           "with several teachers the learner would hold every teacher's LM head: not supported; "
           "use teacher.top_k or teacher.sparse_samples")
    if teacher.combine == "route":
        _check(bool(teacher.route_field), "teacher.route_field",
               "teacher.combine=route picks each prompt's teacher by a data field: name it")
    else:
        _check(not teacher.route_field, "teacher.route_field", "is for teacher.combine=route")
        _check(sum(teacher.coefs or [1.0]) > 0, "teacher.coefs", "the mixture weights must not all be 0")
        # the mixture's log-prob of a sampled token is exact from each teacher's; its top-k or
        # draws are not (a token in one teacher's top-k is in the other's unsent tail)
        _check(not TEACHER_ESTIMATORS[kd.estimator].distribution, "teacher.combine",
               f"an ensemble's target is the mixture of the teachers' distributions, exact per sampled token: "
               f"algorithm.kd.estimator={kd.estimator} needs a distribution payload; use k1, k2, k3 or minillm")


def validate(cfg: Config) -> None:
    """Consistency checks that types alone cannot express. Raises ConfigError."""
    run, data, reward, rollout, learner, teacher, algo = (
        cfg.run, cfg.data, cfg.reward, cfg.rollout, cfg.learner, cfg.teacher, cfg.algorithm)
    kd, reh = algo.kd, algo.rehearsal
    _check(run.steps >= 1, "run.steps", f"must be >= 1, got {run.steps}")
    _check(run.checkpoint_every >= 0, "run.checkpoint_every", "must be >= 0")
    _check(run.keep_checkpoints >= 1, "run.keep_checkpoints", "must be >= 1")
    _check(run.max_restarts >= 0, "run.max_restarts", "must be >= 0 (0: no automatic restart)")
    _check(run.eval_every >= 0, "run.eval_every", "must be >= 0")
    _check(run.eval_samples >= 0, "run.eval_samples", "must be >= 0 (0: greedy accuracy only)")
    _check(0 <= run.eval_curve_samples <= run.eval_samples, "run.eval_curve_samples",
           f"must be in [0, run.eval_samples={run.eval_samples}] (0: run.eval_samples)")
    for k in run.eval_k if run.eval_samples else ():
        _check(1 <= k <= run.eval_samples, "run.eval_k",
               f"pass@{k} needs 1 <= k <= run.eval_samples ({run.eval_samples})")
    _choice("run.resume", run.resume, ("never", "auto"))
    _check(data.max_prompt_tokens >= 1, "data.max_prompt_tokens", "must be >= 1")
    if reward.function is None:
        _choice("reward.name", reward.name, tuple(BUILTIN_REWARDS))
    else:
        mod, _, fn = reward.function.partition(":")
        _check(bool(mod) and bool(fn), "reward.function", f"must look like 'module:function', got {reward.function!r}")
    _check(reward.timeout_s > 0, "reward.timeout_s", "must be > 0")
    _check(reward.max_memory_mb >= 0, "reward.max_memory_mb", "must be >= 0 (0: no cap)")

    for section, c in (("rollout", rollout), ("teacher", teacher)):
        _check(c.num_workers >= 1, f"{section}.num_workers", "must be >= 1")
        _gpus(f"{section}.gpus_per_worker", c.gpus_per_worker)
        tp = c.tensor_parallel_size
        _check(tp >= 1, f"{section}.tensor_parallel_size", f"must be >= 1, got {tp}")
        # a worker uses exactly its tensor-parallel devices: reserving more would hold GPUs nothing uses
        _check(c.gpus_per_worker <= 1 or c.gpus_per_worker == tp, f"{section}.gpus_per_worker",
               f"{c.gpus_per_worker:g} GPUs per worker, but a worker runs on {section}.tensor_parallel_size={tp} "
               f"device(s): set {section}.tensor_parallel_size={c.gpus_per_worker:g} to use them")
        _check(tp == 1 or c.gpus_per_worker in (0, tp), f"{section}.gpus_per_worker",
               f"tensor_parallel_size={tp} needs {tp} whole GPUs per worker (or 0 on CPU), got {c.gpus_per_worker:g}")
    _gpus("learner.gpus_per_worker", learner.gpus_per_worker)
    _check(learner.gpus_per_worker <= 1, "learner.gpus_per_worker", "a learner rank drives one GPU (use world_size)")
    _check(learner.world_size == 1 or learner.gpus_per_worker in (0, 1), "learner.gpus_per_worker",
           f"{learner.gpus_per_worker:g} GPU per rank lets Ray put two of the {learner.world_size} learner ranks on one "
           f"GPU, which NCCL refuses: give each rank a whole GPU (1), or train with one rank")
    _check(learner.world_size >= 1, "learner.world_size", "must be >= 1")
    for section, c in (("rollout", rollout), ("teacher", teacher), ("learner", learner)):
        for name, amount in c.resources.items():
            _check(amount >= 0 and name not in ("CPU", "GPU"), f"{section}.resources.{name}",
                   "custom resources need an amount >= 0 (0 drops the requirement, e.g. on a resume; "
                   "set CPU/GPU with gpus_per_worker)")
    _check(teacher.top_k >= 0, "teacher.top_k", "must be >= 0")
    _check(teacher.sparse_samples >= 0, "teacher.sparse_samples", "must be >= 0")
    _check(teacher.sparse_temperature > 0, "teacher.sparse_temperature", "must be > 0")
    if teacher.golden_path:
        _check(bool(cfg.data.eval_path), "teacher.golden_path",
               "the golden model is scored on the evaluation's samples: set data.eval_path")
        _check(cfg.run.eval_samples >= 1, "run.eval_samples",
               "the golden model is scored on the evaluation's sampled responses: needs run.eval_samples >= 1")
    _check_teachers(teacher, kd)
    _check(0 <= algo.gkd.lmbda <= 1, "algorithm.gkd.lmbda", f"is a probability, got {algo.gkd.lmbda}")
    _choice("algorithm.gkd.off_policy", algo.gkd.off_policy, ("dataset", "teacher"))
    gen = teacher.generation
    _check(gen.num_workers >= 0, "teacher.generation.num_workers", "must be >= 0 (0: the teacher does not generate)")
    _gpus("teacher.generation.gpus_per_worker", gen.gpus_per_worker)
    _check(gen.tensor_parallel_size >= 1, "teacher.generation.tensor_parallel_size", "must be >= 1")
    _check(algo.skd.top_k >= 0, "algorithm.skd.top_k", "must be >= 0 (0: no speculative KD)")
    _check(algo.skd.block >= 1, "algorithm.skd.block", "must be >= 1")
    if algo.skd.top_k:
        _check(algo.gkd.lmbda == 1, "algorithm.gkd.lmbda", "speculative KD builds every sequence: leave lmbda at 1")
        _check(algo.pg_coef == 0, "algorithm.pg_coef",
               "speculative KD's sequences are not the student's samples, which the GRPO term needs: set 0")
        _check(teacher.tensor_parallel_size == 1 and not teacher.others, "algorithm.skd.top_k",
               "speculative KD asks one teacher scorer of one rank (teacher.tensor_parallel_size=1, no teacher.others)")
        _check(TEACHER_ESTIMATORS[kd.estimator].distribution and not kd.estimator.startswith("minillm"),
               "algorithm.kd.estimator", "speculative KD's sequences are not the student's samples: use a "
               "distribution estimator (topk, full, sparse)")
    alpha = kd.minillm.mix_alpha
    _check(0 <= alpha < 1, "algorithm.kd.minillm.mix_alpha", f"must be in [0, 1), got {alpha}")
    if alpha:
        _check(algo.gkd.lmbda == 1 and not algo.skd.top_k, "algorithm.kd.minillm.mix_alpha",
               "the teacher-mixed sampling builds every sequence: not with algorithm.gkd.lmbda < 1 or algorithm.skd")
        _check(teacher.tensor_parallel_size == 1 and not teacher.others, "algorithm.kd.minillm.mix_alpha",
               "the mixed sampling asks one teacher scorer of one rank (teacher.tensor_parallel_size=1, no teacher.others)")
        # the behaviour policy alpha pi_T + (1 - alpha) pi_theta is taken with the learner's pi_theta:
        # the weights that sampled only while no sample is older than the update
        _check(algo.max_staleness == 0, "algorithm.max_staleness",
               "the teacher-mixed sampling's weights use the learner's pi_theta as the sampler's: needs 0")
    if algo.gkd.lmbda < 1 and algo.gkd.off_policy == "teacher":
        _check(gen.num_workers >= 1, "teacher.generation.num_workers",
               "algorithm.gkd.off_policy=teacher samples from the teacher: give it engines (>= 1)")
    _check(algo.distillm.capacity >= 0, "algorithm.distillm.capacity",
           f"must be >= 0 (0: off), got {algo.distillm.capacity}")
    if algo.gkd.lmbda < 1 or algo.distillm.capacity:
        # on a sequence the student did not sample, a sampled-token estimate is not of any KL to
        # the student: GKD takes the divergence of the whole next-token distributions there
        what = f"algorithm.gkd.lmbda={algo.gkd.lmbda}" if algo.gkd.lmbda < 1 else "algorithm.distillm"
        _check(TEACHER_ESTIMATORS[kd.estimator].distribution and not kd.estimator.startswith("minillm"),
               "algorithm.kd.estimator",
               f"{what} trains on sequences the student did not sample, where "
               f"{kd.estimator} estimates nothing: use a distribution estimator (topk, full, sparse)")
    dm = algo.distillm
    if dm.capacity:
        _check(0 <= dm.init_threshold <= 1, "algorithm.distillm.init_threshold",
               f"is a probability, got {dm.init_threshold}")
        _check(dm.raise_by >= 0 and dm.loss_eps >= 0, "algorithm.distillm.raise_by",
               "raise_by and loss_eps must be >= 0")
        _check(algo.gkd.lmbda == 1 and not algo.skd.top_k and not kd.minillm.mix_alpha, "algorithm.distillm.capacity",
               "DistiLLM chooses each prompt's sequences itself: not with algorithm.gkd.lmbda < 1, algorithm.skd or "
               "kd.minillm.mix_alpha")
        _check(bool(cfg.data.eval_path), "data.eval_path",
               "DistiLLM raises its probability of the student's sequences from the validation loss on the "
               "evaluation's reference responses (at every evaluation: run.eval_every): set data.eval_path")
        _check(dm.capacity >= algo.prompts_per_step, "algorithm.distillm.capacity",
               f"holds groups; a step may replay up to algorithm.prompts_per_step ({algo.prompts_per_step}) of them")
    _check(sum((teacher.top_k > 0, teacher.sparse_samples > 0, teacher.send_hidden)) <= 1, "teacher.sparse_samples"
           if teacher.sparse_samples > 0 else "teacher.send_hidden",
           "the teacher sends one distribution payload: its top-k (teacher.top_k), ids drawn from it "
           "(teacher.sparse_samples) or its hidden states (teacher.send_hidden), not two")
    _check(teacher.micro_batch_size >= 1, "teacher.micro_batch_size", "must be >= 1")
    _check(teacher.max_tokens_per_batch >= 0, "teacher.max_tokens_per_batch", "must be >= 0 (0: micro_batch_size rows)")
    _check(teacher.temperature > 0, "teacher.temperature", "must be > 0")
    _choice("teacher.dtype", teacher.dtype, ("auto", "float32", "bfloat16"))

    _check(rollout.samples_per_prompt >= 1, "rollout.samples_per_prompt", "must be >= 1")
    _check(rollout.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    _check(rollout.temperature > 0, "rollout.temperature", "must be > 0 (greedy sampling has no policy gradient)")
    # vLLM's log-probs of a truncated sampler are renormalised over the kept tokens while the
    # learner's are over the whole vocabulary: every TIS weight would become the nucleus mass
    # and the teacher gradient would be off (~25% at top_p=0.9)
    truncation = "the learner's log-probs are over the whole vocabulary, so a truncated sampler would bias " \
                 "the importance weights and the teacher gradient; sample from the full distribution"
    _check(rollout.top_p == 1.0, "rollout.top_p", f"must be 1.0, got {rollout.top_p}: {truncation}")
    _check(rollout.top_k == -1, "rollout.top_k", f"must be -1 (off), got {rollout.top_k}: {truncation}")
    if rollout.gpu_memory_utilization is not None:
        _check(0 < rollout.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "must be in (0, 1]")
        _check(rollout.gpus_per_worker >= 1 or rollout.gpu_memory_utilization <= rollout.gpus_per_worker or
               rollout.gpus_per_worker == 0, "rollout.gpu_memory_utilization",
               f"{rollout.gpu_memory_utilization} of a GPU's memory is more than the engine's share of it "
               f"(rollout.gpus_per_worker={rollout.gpus_per_worker:g}): whatever shares the GPU would run out")
    _check(rollout.sync_timeout_s > 0, "rollout.sync_timeout_s", "must be > 0")
    _check(rollout.max_failures >= 0, "rollout.max_failures", "must be >= 0 (0: the first failure stops the run)")
    _choice("rollout.weight_transport", rollout.weight_transport, TRANSPORTS)
    _check(rollout.weight_bucket_mb >= 1, "rollout.weight_bucket_mb", "must be >= 1")

    _check(learner.zero_stage in (0, 1, 2, 3), "learner.zero_stage", f"must be 0, 1, 2 or 3, got {learner.zero_stage}")
    _check(not (learner.log_term_grads and learner.zero_stage == 3), "learner.log_term_grads",
           "needs the whole gradient on each rank: ZeRO stage 0, 1 or 2, not 3")
    _check(learner.lr > 0, "learner.lr", f"must be > 0, got {learner.lr}")
    _check(learner.warmup_steps >= 0, "learner.warmup_steps", "must be >= 0")
    _check(learner.micro_batch_size >= 1, "learner.micro_batch_size", "must be >= 1")
    _check(learner.max_tokens_per_micro_batch >= 0, "learner.max_tokens_per_micro_batch",
           "must be >= 0 (0: micro_batch_size rows)")
    _check(learner.logprob_chunk >= 1, "learner.logprob_chunk", "must be >= 1")

    _check(algo.prompts_per_step >= 1, "algorithm.prompts_per_step", "must be >= 1")
    _choice("algorithm.advantage", algo.advantage, ADVANTAGES)
    _choice("algorithm.aggregation", algo.aggregation, AGGREGATIONS)
    _check(0 <= algo.clip_low < 1, "algorithm.clip_low", f"must be in [0, 1), got {algo.clip_low}")
    _check(algo.clip_high >= 0, "algorithm.clip_high", "must be >= 0")
    _check(algo.pg_coef >= 0, "algorithm.pg_coef", "must be >= 0")
    _check(algo.pg_coef > 0 or algo.kd.coef > 0 or algo.rehearsal.coef > 0, "algorithm.pg_coef",
           "with pg_coef, kd.coef and rehearsal.coef all 0 there is nothing to train")
    _check(algo.tis_cap == 0 or algo.tis_cap >= 1, "algorithm.tis_cap", "must be 0 (off) or >= 1")
    # the GRPO term compares the responses of a group; nothing else needs groups
    _check(rollout.samples_per_prompt >= 2 or algo.pg_coef == 0, "rollout.samples_per_prompt",
           f"the GRPO term (algorithm.pg_coef={algo.pg_coef:g}) compares responses within a group: needs >= 2 "
           f"(distillation alone, pg_coef=0, takes 1)")
    sequences = algo.prompts_per_step * rollout.samples_per_prompt
    _check(sequences % learner.world_size == 0, "algorithm.prompts_per_step",
           f"prompts_per_step x samples_per_prompt = {sequences} sequences must split evenly over "
           f"learner.world_size={learner.world_size} ranks")

    _check(algo.max_staleness >= 0, "algorithm.max_staleness", "must be >= 0 (0: strictly on-policy)")
    _check(algo.max_staleness == 0 or not engines_sleep(cfg), "algorithm.max_staleness",
           f"{algo.max_staleness} generates the next steps while the learners train, but the engines sleep then "
           f"(rollout.sleep_while_training, on by default when engines and learners take fractions of GPUs): "
           f"set max_staleness=0, or give the engines GPUs of their own")
    _check(rollout.prompts_per_request >= 0, "rollout.prompts_per_request", "must be >= 0 (0: automatic)")
    if rollout.prompts_per_request:
        requests, left = divmod(algo.prompts_per_step, rollout.prompts_per_request)
        _check(left == 0 and requests % learner.world_size == 0, "rollout.prompts_per_request",
               f"algorithm.prompts_per_step={algo.prompts_per_step} must split into requests of "
               f"{rollout.prompts_per_request} prompts whose count is a multiple of "
               f"learner.world_size={learner.world_size} (each rank trains whole requests)")
        _check(requests >= 2 or not teacher_generates(cfg), "rollout.prompts_per_request",
               "the teacher's samples are generated by requests of their own: a step needs at least 2 requests")
    else:
        _check(requests_per_step(cfg) > 0, "rollout.prompts_per_request",
               f"no request count splits prompts_per_step={algo.prompts_per_step} evenly over "
               f"learner.world_size={learner.world_size} ranks; set rollout.prompts_per_request")

    _named("algorithm.kd.divergence", kd.divergence, DIVERGENCES, _first_line)
    _named("algorithm.kd.estimator", kd.estimator, TEACHER_ESTIMATORS, lambda e: e.about)
    _choice("algorithm.kd.schedule", kd.schedule, SCHEDULES)
    _choice("algorithm.kd.mask", kd.mask, KD_MASKS)
    _choice("algorithm.kd.norm", kd.norm, KD_NORMS)
    _check(kd.coef >= 0, "algorithm.kd.coef", "must be >= 0")
    _check(0 <= kd.coef_min <= kd.coef or kd.schedule == "constant", "algorithm.kd.coef_min", "must be in [0, coef]")
    _check(kd.decay >= 0, "algorithm.kd.decay", "must be >= 0")
    _check(0 <= kd.beta <= 1, "algorithm.kd.beta", "must be in [0, 1]")
    _check(0 <= kd.skew < 1, "algorithm.kd.skew", "must be in [0, 1)")
    _check(kd.is_cap >= 1, "algorithm.kd.is_cap", f"must be >= 1 (the truncation of pi_theta / mu), got {kd.is_cap}")
    _check(0 <= kd.taid.t_start <= kd.taid.t_end <= 1, "algorithm.kd.taid.t_start",
           f"TAID needs 0 <= t_start <= t_end <= 1, got t_start={kd.taid.t_start}, t_end={kd.taid.t_end}")
    _check(kd.taid.alpha >= 0, "algorithm.kd.taid.alpha", f"must be >= 0, got {kd.taid.alpha}")
    _check(0 <= kd.taid.beta < 1, "algorithm.kd.taid.beta", f"must be in [0, 1), got {kd.taid.beta}")
    _check(0 <= kd.minillm.gamma <= 1, "algorithm.kd.minillm.gamma", f"must be in [0, 1], got {kd.minillm.gamma}")
    if kd.estimator.startswith("minillm"):
        _check(kd.divergence == "reverse_kl", "algorithm.kd.divergence",
               f"MiniLLM minimises the sequence-level reverse KL: {kd.divergence} is not its single-step part "
               f"(use reverse_kl)")
    estimator = TEACHER_ESTIMATORS[kd.estimator]
    if estimator.distribution and estimator.payload == "sampled":
        _check(teacher.sparse_samples >= 1, "teacher.sparse_samples",
               f"algorithm.kd.estimator={kd.estimator} needs ids drawn from the teacher: teacher.sparse_samples >= 1")
        _check(kd.divergence == "forward_kl", "algorithm.kd.divergence",
               f"{kd.estimator} estimates KL(teacher || student) from the teacher's draws, without bias for that "
               f"divergence only: set forward_kl, not {kd.divergence}")
    elif estimator.distribution and estimator.payload == "hidden":
        _check(teacher.send_hidden, "teacher.send_hidden",
               f"algorithm.kd.estimator={kd.estimator} needs the teacher's hidden states: teacher.send_hidden=true")
    elif estimator.distribution:
        _check(teacher.top_k >= 1, "teacher.top_k",
               f"algorithm.kd.estimator={kd.estimator} needs the teacher's distribution: teacher.top_k >= 1")
    else:
        _check(kd.divergence == "reverse_kl", "algorithm.kd.estimator",
               f"{kd.estimator} estimates KL(student || teacher) from sampled tokens; divergence "
               f"{kd.divergence} needs the teacher's distribution: set algorithm.kd.estimator=topk and teacher.top_k")

    _named("algorithm.rehearsal.divergence", reh.divergence, GENERATORS, _first_line)
    _check(reh.coef >= 0, "algorithm.rehearsal.coef", "must be >= 0")
    _check(0 < reh.alpha < 1, "algorithm.rehearsal.alpha", "must be in (0, 1)")
    _check(reh.samples_per_step >= 1, "algorithm.rehearsal.samples_per_step", "must be >= 1")
    _check(1 <= reh.presample_min_correct <= reh.presample_samples, "algorithm.rehearsal.presample_min_correct",
           "must be in [1, presample_samples]")
    if reh.coef > 0:
        _check(bool(reh.data_path), "algorithm.rehearsal.data_path",
               "rehearsal.coef > 0 needs the presampled data (run `rayskd presample CONFIG`)")


def notices(cfg: Config) -> list[str]:
    """Valid but easy-to-miss consequences of a configuration, reported when a run starts."""
    out = []
    tau_s, tau_t = cfg.rollout.temperature, cfg.teacher.temperature
    if tau_s != tau_t and (cfg.algorithm.kd.coef > 0):
        out.append(f"teacher.temperature={tau_t} differs from rollout.temperature={tau_s}: the student's "
                   f"log-probs are taken at {tau_s} and the teacher's at {tau_t}, so the teacher term pulls "
                   f"the student's logits towards {tau_s / tau_t:g} x the teacher's, not the teacher itself")
    return out
