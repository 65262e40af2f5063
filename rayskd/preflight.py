"""Checks that run before any actor starts: model paths, tokenizers, data, reward function.
Every problem is a `UsageError` (exit status 2) with a message that says what to fix."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .config import Config
from .data.dataset import DataError, PromptDataset, read_rows, render_prompt


class UsageError(Exception):
    """Bad input found before anything expensive started: exit status 2."""


@dataclass
class Inputs:
    tokenizer_len: int
    eos_id: int
    train: PromptDataset | None  # None: checked for `rayskd eval` (need_train=False)
    eval: PromptDataset | None
    max_model_len: int
    teacher_of: list[int] | None = None  # each training row's teacher (teacher.combine=route)


# config attributes by which an architecture's logits stop being h @ W^T, and what they do
NONLINEAR_HEAD = {
    "final_logit_softcapping": "soft-caps its logits (c * tanh(z / c))",  # Gemma 2/3
    "logit_scale": "multiplies its logits by a constant",  # Cohere
    "logits_scaling": "divides its logits by a constant",  # Granite
    "dim_model_base": "rescales the hidden state before the LM head",  # MiniCPM
}
NEUTRAL = (None, 1, 1.0)
REWARD_PROBE_ROWS = 4  # training rows the reward function is tried on before anything starts


def _check_model(key: str, path: str) -> None:
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"{key}: no Hugging Face model at {path} (expected a directory with config.json)")
    check_logit_head(key, path)


def check_logit_head(key: str, path: str) -> None:
    """rayskd forms logits as h @ W^T from the final hidden state, in fp32 chunks (never the
    model's own full logits): refuse architectures where that is not what the model computes
    (an LM-head bias, logit scaling or soft-capping). Reads the config and, for the bias, the
    checkpoint's tensor names and shapes (a few KB of safetensors headers); only a directory
    without safetensors weights builds the model on the meta device, which imports
    transformers' modelling code (~4 s of a CPU core, before anything else can start)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr, what in NONLINEAR_HEAD.items():
        value = getattr(text, attr, None)
        if value not in NEUTRAL:
            raise UsageError(f"{key}: {path} ({config.model_type}) {what} ({attr}={value}); rayskd computes "
                             f"log-probs as hidden @ lm_head^T and does not support such models yet")
    shapes = checkpoint_shapes(path)
    has_bias = head_bias_in(shapes, text.vocab_size) if shapes else meta_head_has_bias(config)
    if has_bias:
        raise UsageError(f"{key}: {path} ({config.model_type}) has a bias on its LM head; rayskd computes "
                         f"log-probs as hidden @ lm_head^T and does not support such models yet")


def checkpoint_shapes(path: str) -> dict[str, list[int]]:
    """{tensor name: shape} of every safetensors file in `path` (headers only); empty when the
    weights are not in safetensors."""
    import glob

    from safetensors import safe_open

    shapes = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(file, "pt") as f:
            shapes.update({name: f.get_slice(name).get_shape() for name in f.keys()})
    return shapes


def head_bias_in(shapes: dict[str, list[int]], vocab_size: int) -> bool:
    """A bias of `vocab_size` entries beside a [vocab_size, hidden] weight of the same module:
    an output projection onto the vocabulary with a bias, whatever the architecture names it."""
    for name, shape in shapes.items():
        if name.endswith(".bias") and list(shape) == [vocab_size]:
            weight = shapes.get(name[:-len("bias")] + "weight")
            if weight is not None and len(weight) == 2 and weight[0] == vocab_size:
                return True
    return False


def meta_head_has_bias(config) -> bool:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return getattr(model.get_output_embeddings(), "bias", None) is not None


def check_tensor_parallel(key: str, path: str, tp: int, teacher: bool) -> None:
    """A model splits over `tp` ranks only if its attention heads do (vLLM, transformers), and,
    for a teacher, if its architecture has a tensor-parallel plan and its LM-head rows split
    evenly (transformers gathers the head's output): say so before anything starts."""
    if tp == 1:
        return
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    what = f"{key.split('.')[0]}.tensor_parallel_size={tp}"
    for attr in ("num_attention_heads", "num_key_value_heads"):
        n = getattr(text, attr, None)
        if n is not None and n % tp:
            raise UsageError(f"{what}: {path} has {attr}={n}, which does not split over {tp} ranks")
    if teacher:
        if not getattr(text, "base_model_tp_plan", None):
            raise UsageError(f"{what}: transformers has no tensor-parallel plan for {config.model_type} ({path}); "
                             f"use teacher.tensor_parallel_size=1")
        if text.vocab_size % tp:
            raise UsageError(f"{what}: {path}'s LM head has {text.vocab_size} rows, which do not split over {tp} "
                             f"ranks (pad the embeddings to a multiple of {tp})")


def _check_rehearsal(cfg: Config) -> None:
    """The presampled reference log-probs must have been made at the temperature and in the
    dtype the learner will compute its own in: otherwise u = pi_theta / pi_ref != 1 at the
    start and the rehearsal term pulls towards a policy that never existed."""
    import json

    from .rehearsal import meta_path, rehearsal_meta

    path = cfg.algorithm.rehearsal.data_path
    if not os.path.isfile(path):
        raise UsageError(f"algorithm.rehearsal.data_path: {path} does not exist (run `rayskd presample CONFIG`)")
    if not os.path.isfile(meta_path(path)):
        raise UsageError(f"algorithm.rehearsal.data_path: {path} has no {os.path.basename(meta_path(path))} "
                         f"recording its temperature and dtype (made by an older rayskd?): run `rayskd presample` again")
    with open(meta_path(path)) as f:
        made = json.load(f)
    want = rehearsal_meta(cfg)
    for field, key in (("temperature", "rollout.temperature"), ("dtype", "learner.bf16")):
        if made.get(field) != want[field]:
            raise UsageError(f"{key}: the rehearsal data {path} was made with {field}={made.get(field)}, this run "
                             f"uses {want[field]}: run `rayskd presample` again with this config")


def _load_tokenizer(key: str, path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise UsageError(f"{key}: cannot load the tokenizer at {path}: {str(e).splitlines()[0]}") from None


def _check_scorer(key: str, path: str, tensor_parallel: int, student_tok):
    """A model that scores the student's token ids (the teacher, the golden model): it loads,
    splits over `tensor_parallel` ranks, and its vocabulary and end-of-sequence id are the
    student's. Returns its tokenizer."""
    _check_model(key, path)
    check_tensor_parallel("teacher.tensor_parallel_size", path, tensor_parallel, True)
    tok = _load_tokenizer(key, path)
    if student_tok.get_vocab() != tok.get_vocab():
        s, t = student_tok.get_vocab(), tok.get_vocab()
        diff = sorted(set(s.items()) ^ set(t.items()))[:3]
        raise UsageError(f"{key}: its tokenizer differs from the student's ({len(s)} vs {len(t)} tokens; e.g. "
                         f"{diff}): it must score the same token ids")
    if student_tok.eos_token_id != tok.eos_token_id:
        raise UsageError(f"{key}: end-of-sequence ids differ (student {student_tok.eos_token_id}, "
                         f"this model {tok.eos_token_id})")
    return tok


def load_split(cfg: Config, path: str, tokenizer, route_key: str = "") -> PromptDataset:
    rows, malformed = read_rows(path, cfg.data.prompt_key, cfg.data.answer_key, route_key)
    return PromptDataset(rows, tokenizer, cfg.data.max_prompt_tokens, cfg.data.chat_template, cfg.data.system_prompt,
                         skipped_malformed=malformed)


def check_same_template(student_tok, teacher_tok, system_prompt: str | None) -> None:
    """The teacher scores the student's tokens as the student's template rendered them: when
    the teacher's own template renders the same conversation differently, its log-probs are
    those of a context it was never trained on, and the teacher signal is silently wrong."""
    conversation = [{"role": "user", "content": "What is 2 + 3?"}]
    if not getattr(teacher_tok, "chat_template", None):
        raise UsageError("teacher.path: the teacher's tokenizer has no chat template, the student's prompts are "
                         "chat-formatted; set teacher.allow_template_mismatch=true to train anyway")
    ours = render_prompt(student_tok, conversation, True, system_prompt)
    theirs = render_prompt(teacher_tok, conversation, True, system_prompt)
    if ours != theirs:
        raise UsageError(f"teacher.path: the teacher's chat template renders a conversation differently from the "
                         f"student's ({ours!r} vs {theirs!r}): the teacher would score a context it was not "
                         f"trained on; set teacher.allow_template_mismatch=true to train anyway")


def check_gpu_layout(cfg: Config, available: float, where: str) -> None:
    """A layout the cluster cannot hold is refused before any actor starts: more GPUs than
    `available` (the GPUs of this machine, or of the cluster at RAY_ADDRESS)."""
    from .config import gpus_asked

    asked = gpus_asked(cfg)
    if asked > available + 1e-9:
        roles = ", ".join(f"{role} {n} x {g:g}" for role, n, g in (
            ("rollout", cfg.rollout.num_workers, cfg.rollout.gpus_per_worker),
            ("teacher", cfg.teacher.num_workers, cfg.teacher.gpus_per_worker),
            ("learner", cfg.learner.world_size, cfg.learner.gpus_per_worker)) if g > 0)
        raise UsageError(f"*.gpus_per_worker: the run asks for {asked:g} GPUs ({roles}) and {where} has "
                         f"{available:g}; lower num_workers / world_size or gpus_per_worker (fractions share a GPU)")


def local_gpus() -> int:
    """The GPUs of this machine, for a local Ray cluster."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _resolve_model(key: str, value: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(value)
    except Exception as e:
        raise UsageError(f"{key}: {value} is neither a local directory nor a model in the Hugging Face cache "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); download it, or unset "
                         f"HF_HUB_OFFLINE where there is network") from None


def resolve_models(cfg: Config) -> Config:
    """student.path / teacher.path given as Hugging Face model ids become local directories:
    the cached snapshot (HF_HUB_OFFLINE=1, as scripts/_env.sh sets) or a download where there
    is network. Exit 2 when neither works."""
    from .config import MODEL_KEYS, _replace, get_key, is_model_id

    for key in MODEL_KEYS:
        value = get_key(cfg, key)
        if not value or not is_model_id(value):
            continue
        cfg = _replace(cfg, key, _resolve_model(key, value))
    others = [_resolve_model("teacher.others", v) if is_model_id(v) else v for v in cfg.teacher.others]
    return _replace(cfg, "teacher.others", others)


def check_inputs(cfg: Config, need_teacher: bool = True, need_rehearsal: bool = True,
                 need_train: bool = True) -> Inputs:
    """Everything a run needs, checked before anything starts. `need_train=False` (rayskd eval):
    the eval split only."""
    from .rewards.runner import RewardError, RewardRunner

    # the reward function is imported in a process of its own, as training will: started first,
    # so that its imports overlap the model and data checks below
    runner = RewardRunner(cfg.reward.name, cfg.reward.function, cfg.reward.timeout_s, (os.getcwd(),),
                          cfg.reward.max_memory_mb, wait=False)
    try:
        inputs = _check_inputs(cfg, need_teacher, need_rehearsal, need_train)
        rows = (inputs.train or inputs.eval).rows[:REWARD_PROBE_ROWS]
        runner.check([(r["prompt"], str(r["answer"]), r["answer"]) for r in rows])  # tried on a few rows
    except RewardError as e:
        raise UsageError(f"reward: {e}") from None
    finally:
        runner.close()
    return inputs


def _check_inputs(cfg: Config, need_teacher: bool, need_rehearsal: bool, need_train: bool) -> Inputs:
    if cfg.run.wandb_project:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise UsageError(f"run.wandb_project={cfg.run.wandb_project}: Weights & Biases is not installed "
                             f"(pip install 'rayskd[wandb]')")
    _check_model("student.path", cfg.student.path)
    check_tensor_parallel("rollout.tensor_parallel_size", cfg.student.path, cfg.rollout.tensor_parallel_size, False)
    student_tok = _load_tokenizer("student.path", cfg.student.path)
    if need_teacher:
        teacher_tok = _check_scorer("teacher.path", cfg.teacher.path, cfg.teacher.tensor_parallel_size, student_tok)
        for path in cfg.teacher.others:
            _check_scorer("teacher.others", path, cfg.teacher.tensor_parallel_size, student_tok)
        if cfg.teacher.golden_path:
            _check_scorer("teacher.golden_path", cfg.teacher.golden_path, cfg.teacher.tensor_parallel_size, student_tok)
        if cfg.teacher.send_hidden and not checkpoint_shapes(cfg.teacher.path):
            raise UsageError(f"teacher.send_hidden: each learner reads the teacher's LM head from its safetensors "
                             f"files, and {cfg.teacher.path} has none")
    if need_rehearsal and cfg.algorithm.rehearsal.coef > 0:
        _check_rehearsal(cfg)
    try:
        train = load_split(cfg, cfg.data.train_path, student_tok, cfg.teacher.route_field) if need_train else None
        evals = load_split(cfg, cfg.data.eval_path, student_tok) if cfg.data.eval_path else None
    except DataError as e:
        raise UsageError(f"data: {e}") from None
    chat = any(split.chat for split in (train, evals) if split is not None)
    if need_teacher and chat and not cfg.teacher.allow_template_mismatch:
        check_same_template(student_tok, teacher_tok, cfg.data.system_prompt)
    for key, split in (("data.train_path", train), ("data.eval_path", None if need_train else evals)):
        if split is not None and len(split) == 0:
            raise UsageError(f"{key}: every prompt is longer than data.max_prompt_tokens="
                             f"{cfg.data.max_prompt_tokens} ({split.skipped_too_long} skipped)")
    if need_train and len(train) < cfg.algorithm.prompts_per_step:
        raise UsageError(f"algorithm.prompts_per_step={cfg.algorithm.prompts_per_step} is more than the "
                         f"{len(train)} usable training prompts")
    from transformers import AutoConfig

    max_model_len = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    limit = getattr(AutoConfig.from_pretrained(cfg.student.path), "max_position_embeddings", None)
    if limit is not None and max_model_len > limit:
        raise UsageError(f"data.max_prompt_tokens + rollout.max_new_tokens = {max_model_len} exceeds the student's "
                         f"max_position_embeddings={limit}")
    teacher_of = route_teachers(cfg, train) if need_train and cfg.teacher.route_field else None
    return Inputs(len(student_tok), student_tok.eos_token_id, train, evals, max_model_len, teacher_of)


def route_teachers(cfg: Config, train: PromptDataset) -> list[int]:
    """Each training row's teacher: its `teacher.route_field` value, a teacher's name
    (teacher.names) or index. Exit 2 at the first row that names none."""
    from .config import teacher_names

    names = teacher_names(cfg)
    index = {**{str(i): i for i in range(len(names))}, **{n: i for i, n in enumerate(names)}}
    out = []
    for i, row in enumerate(train.rows):
        if row["route"] not in index:
            what = "has no such field" if row["route"] is None else f"is {row['route']!r}"
            raise UsageError(f"teacher.route_field={cfg.teacher.route_field}: training row {i + 1} {what}; each row "
                             f"must name its teacher: one of {names} (teacher.names) or an index 0..{len(names) - 1}")
        out.append(index[row["route"]])
    return out
