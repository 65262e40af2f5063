"""The learners' training state in a form that does not depend on how it was partitioned.

A checkpoint holds, for every parameter by name, its fp32 master weights and both Adam moments
as whole tensors, plus the optimizer's step and hyperparameters, the scheduler and the engine's
counters. Any number of ranks at any ZeRO stage (0-3) write it, and any other number at any
other stage read it back: each rank takes its own fragment of every tensor. Restoring copies
values, so with an unchanged layout the resumed run is bit-identical to an uninterrupted one.

Layout, in a checkpoint's `learner/` directory:
    state-00000.safetensors ...  {name}/master, {name}/exp_avg, {name}/exp_avg_sq (fp32), in
                                 files of at most SHARD_BYTES, written by rank 0
    state.json                   step, optimizer hyperparameters, scheduler, counters, the
                                 layout it was written by, and which file holds which parameter
    rng_rank{r}.safetensors      rank r's torch RNG state (a new rank takes rank 0's)

Whole tensors are assembled with DeepSpeed's public `deepspeed.utils.safe_get_full_*` (ZeRO 1-3:
collectives, so every rank walks the parameters in the same order) and put back with
`safe_set_full_*` (ZeRO-1/2) or `safe_set_local_*` (ZeRO-3: each rank its padded partition,
since DeepSpeed 0.19.8's set_full overruns the last rank's). Stage 0 keeps whole tensors
already: the parameter itself, or its fp32 copy in DeepSpeed's bf16 optimizer. DeepSpeed
internals used, all in this file: where the torch optimizer's tensors live before the first
step (`optimizer_tensors`, which a restore into a fresh engine must give state), the ZeRO-1/2
hook that links parameters to that state, and a ZeRO-3 parameter's partition (`ds_tensor`).
"""
from __future__ import annotations

import json
import os

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")  # torch AdamW's (amsgrad off)
SHARD_BYTES = 2 << 30
STATE_DIR = "learner"


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, bf16)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def optimizer_tensors(engine) -> list[torch.Tensor]:
    """The tensors the torch optimizer steps: ZeRO-3's flat fp32 partitions (it swaps them into
    its param groups one at a time), else whatever its param groups hold (ZeRO-1/2: flat fp32
    partitions; stage 0: the parameters, or their fp32 copies under bf16)."""
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if flat is not None:
        return list(flat)
    return [p for g in torch_optimizer(engine).param_groups for p in g["params"]]


def _stage0_master(engine, param: torch.Tensor) -> torch.Tensor:
    """Stage 0: the fp32 tensor the optimizer steps for `param` (its copy under bf16)."""
    opt = engine.optimizer
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):  # DeepSpeed's bf16/fp16 optimizer
        for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups):
            for lp, hp in zip(lp_group, hp_group):
                if lp is param:
                    return hp
        raise KeyError("parameter not found in the optimizer's groups")
    return param


def _partitioned(engine) -> bool:
    return engine.zero_optimization_stage() > 0


def full_tensors(engine, param: torch.Tensor, stepped: bool) -> dict[str, torch.Tensor]:
    """{master, exp_avg, exp_avg_sq} of one parameter as whole fp32 tensors (collective under
    ZeRO). `stepped`: the optimizer has made a step (`step_count` > 0)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    # before the first update that succeeded the optimizer has no moments (DeepSpeed's getters
    # fail on them): they are zeros, what the first step starts from, so a run can be checkpointed
    # in every state it can stop in
    if _partitioned(engine):
        out = {"master": safe_get_full_fp32_param(param)}
        out.update({k: safe_get_full_optimizer_state(param, k) if stepped else None for k in MOMENTS})
    else:
        master = _stage0_master(engine, param)
        state = torch_optimizer(engine).state[master]
        out = {"master": master.detach(), **{k: state[k] if stepped else None for k in MOMENTS}}
    out = {k: torch.zeros_like(out["master"]) if v is None else v for k, v in out.items()}
    return {k: v.detach().float().cpu().reshape(param.ds_shape if hasattr(param, "ds_shape") else param.shape)
            for k, v in out.items()}


def _set_full_tensors(engine, param: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
    """Each rank copies its own fragment of `values` (on the optimizer's device) into the
    optimizer, and into the model weight."""
    import deepspeed
    from deepspeed.utils import (
        safe_set_full_fp32_param, safe_set_full_optimizer_state, safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    master = None
    if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partition (DeepSpeed's set_full misses the last one's padding)
        per = param.ds_tensor.numel()
        start = torch.distributed.get_rank() * per

        def mine(v: torch.Tensor) -> torch.Tensor:
            piece = v.flatten()[start:start + per]
            return torch.cat([piece, piece.new_zeros(per - piece.numel())])

        safe_set_local_fp32_param(param, mine(values["master"]))
        for k in MOMENTS:
            safe_set_local_optimizer_state(param, mine(values[k]), k)
    elif _partitioned(engine):
        safe_set_full_fp32_param(param, values["master"])
        for k in MOMENTS:
            safe_set_full_optimizer_state(param, values[k], k)
    else:
        master = _stage0_master(engine, param)
        master.data.copy_(values["master"])
        state = torch_optimizer(engine).state[master]
        for k in MOMENTS:
            state[k].copy_(values[k])
    # the model's weight is the master in the model's dtype, as after every optimizer step
    if hasattr(param, "ds_id"):  # ZeRO-3: each rank holds a partition; rank 0's full copy is scattered
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                param.data.copy_(values["master"])
    elif master is not param:  # (stage 0 in fp32: the master is the weight itself)
        param.data.copy_(values["master"])


def _ensure_optimizer_state(engine, step: float) -> None:
    """A fresh engine's optimizer has no state until its first step: create it (zeros, to be
    overwritten) and give every tensor the saved step count."""
    opt = torch_optimizer(engine)
    for t in optimizer_tensors(engine):
        state = opt.state[t]
        if not state:
            group = next((g for g in opt.param_groups if any(p is t for p in g["params"])), opt.param_groups[0])
            on_device = group.get("fused") or group.get("capturable")
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=t.device if on_device else "cpu")
            for k in MOMENTS:
                state[k] = torch.zeros_like(t, memory_format=torch.preserve_format)
        state["step"].fill_(step)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO-1/2, bf16: fragments
    if link is not None:
        link()


def step_count(engine) -> float:
    opt = torch_optimizer(engine)
    steps = {float(opt.state[t]["step"]) for t in optimizer_tensors(engine) if opt.state[t]}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer tensors disagree on the step count: {sorted(steps)}")
    return steps.pop() if steps else 0.0


def _hyperparameters(engine) -> dict:
    group = torch_optimizer(engine).param_groups[0]
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()
            if k != "params" and isinstance(v, (int, float, bool, tuple, list, type(None)))}


def _named_parameters(model) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def iter_full_tensors(engine, model):
    """(name, {master, exp_avg, exp_avg_sq}) for every trained parameter, whole, on every rank
    (collective under ZeRO: every rank iterates to the end, in the same order)."""
    stepped = step_count(engine) > 0
    for name, param in _named_parameters(model):
        yield name, full_tensors(engine, param, stepped)


def save(engine, model, directory: str, rank: int, world_size: int, extra: dict) -> None:
    """Write the learner state into `directory`/learner (every rank calls this; rank 0 writes
    the tensors, every rank its RNG). `model`: the language model inside the engine (its
    parameter names are the keys); `extra`: JSON-able fields to keep (scheduler, counters)."""
    from safetensors.torch import save_file

    out = os.path.join(directory, STATE_DIR)
    os.makedirs(out, exist_ok=True)
    index, shard, shard_bytes, files = {}, {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes, files
        if shard:
            save_file(shard, os.path.join(out, f"state-{files:05d}.safetensors"))
            files += 1
        shard, shard_bytes = {}, 0

    for name, tensors in iter_full_tensors(engine, model):
        if rank != 0:
            continue
        for k, v in tensors.items():
            shard[f"{name}/{k}"] = v.contiguous()
            shard_bytes += v.numel() * v.element_size()
        index[name] = f"state-{files:05d}.safetensors"
        if shard_bytes >= SHARD_BYTES:
            flush()
    save_file({"state": torch.get_rng_state()}, os.path.join(out, f"rng_rank{rank}.safetensors"))
    if rank != 0:
        return
    flush()
    meta = {"step": step_count(engine), "hyperparameters": _hyperparameters(engine),
            "zero_stage": engine.zero_optimization_stage(), "world_size": world_size, "parameters": index, **extra}
    with open(meta_path(directory), "w") as f:
        json.dump(meta, f, indent=1)


def meta_path(directory: str) -> str:
    """A checkpoint's state.json (its absence: not a checkpoint this format can resume)."""
    return os.path.join(directory, STATE_DIR, "state.json")


def read_meta(directory: str) -> dict:
    with open(meta_path(directory)) as f:
        return json.load(f)


def load(engine, model, directory: str, rank: int) -> dict:
    """Restore what `save` wrote, into this engine's layout; returns the saved metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    src = os.path.join(directory, STATE_DIR)
    meta = read_meta(directory)
    params = _named_parameters(model)
    missing = sorted({n for n, _ in params} - set(meta["parameters"]))
    if missing:
        raise ValueError(f"checkpoint {directory} has no state for parameters {missing[:5]} (another model?)")
    _ensure_optimizer_state(engine, meta["step"])
    for group in torch_optimizer(engine).param_groups:
        group.update({k: (tuple(v) if isinstance(group.get(k), tuple) else v)
                      for k, v in meta["hyperparameters"].items() if k in group})
    device = optimizer_tensors(engine)[0].device
    files = {f: safe_open(os.path.join(src, f), "pt") for f in sorted(set(meta["parameters"].values()))}
    for name, param in params:
        stored = files[meta["parameters"][name]]
        values = {k: stored.get_tensor(f"{name}/{k}").to(device) for k in ("master", *MOMENTS)}
        _set_full_tensors(engine, param, values)  # collective under ZeRO-3: every rank, same order
    rng = os.path.join(src, f"rng_rank{rank}.safetensors")
    torch.set_rng_state(load_file(rng if os.path.exists(rng) else os.path.join(src, "rng_rank0.safetensors"))["state"])
    return meta
