"""DeepSpeed for the learners: the engine's config, its optimizer, and the two DeepSpeed parts
rayskd goes without (each measured as start-up time a learner rank spent for nothing). Imported
by the learner only, inside its constructor."""
from __future__ import annotations

import math

import torch

from .config import LearnerConfig

MUON_MODULES = ("deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.zero.muon.original_muon")


def engine_config(cfg: LearnerConfig, world_size: int) -> dict:
    """The DeepSpeed config of a learner rank."""
    return {
        # the learner owns the accumulation: any number of backward passes, then one step()
        # (micro-batches by token budget vary in number from step to step)
        "managed_gradient_accumulation": False,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.micro_batch_size * world_size,
        # clipping also makes DeepSpeed check the global gradient norm: a non-finite one skips
        # the update on every rank (Learner.train_step); except at ZeRO-0 in fp32, where the
        # optimizer does both itself (checked_optimizer)
        "gradient_clipping": 0.0 if own_norm_check(cfg) else cfg.grad_clip if cfg.grad_clip > 0 else 1e12,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def own_norm_check(cfg: LearnerConfig) -> bool:
    """At ZeRO-0 in fp32 DeepSpeed hands the client optimizer the all-reduced gradients as they
    are: it clips them, but neither reports their norm nor skips a non-finite update (NaN
    gradients were applied: the weights became NaN). Its ZeRO and bf16 optimizers do both."""
    return cfg.zero_stage == 0 and not cfg.bf16


def checked_optimizer(params, cfg: LearnerConfig):
    """The learner's AdamW (fused on CPU too: the per-op update took 5.3 s of a 12 s ZeRO-2 step
    of Llama-3.2-1B cut to 2 layers). Where DeepSpeed does not check the gradient norm
    (`own_norm_check`), an AdamW that clips to the global norm, keeps it where DeepSpeed's engine
    reads it (`_global_grad_norm`), and skips a non-finite update (`overflow`: the engine counts a
    skipped step and leaves the schedule). At ZeRO-0 the gradients are already all-reduced when
    the optimizer steps, so every rank takes the same decision."""
    kwargs = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), fused=True)
    if not own_norm_check(cfg):
        return torch.optim.AdamW(params, **kwargs)
    return CheckedAdamW(params, max_norm=cfg.grad_clip if cfg.grad_clip > 0 else float("inf"), **kwargs)


class CheckedAdamW(torch.optim.AdamW):
    """AdamW that clips to the global gradient norm and skips a non-finite update
    (`checked_optimizer`)."""

    def __init__(self, params, max_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm, self.overflow, self._global_grad_norm = max_norm, False, None

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(grads, self.max_norm))  # max inf: measured only
        self._global_grad_norm, self.overflow = norm, not math.isfinite(norm)
        return None if self.overflow else super().step(closure)


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
        raise RuntimeError("rayskd's learners do not use DeepSpeed's Muon (see deepspeed_setup.skip_muon_import)")

    for name in MUON_MODULES:
        if name not in sys.modules:
            stand_in = types.ModuleType(name, "rayskd: a stand-in, DeepSpeed's Muon is not used by rayskd")
            stand_in.MuonWithAuxAdam, stand_in.muon_update = MuonWithAuxAdam, muon_update
            sys.modules[name] = stand_in


def initialize(model, optimizer, scheduler, cfg: LearnerConfig, world_size: int):
    """A DeepSpeed engine over `model` (the process group is already up and adopted)."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=engine_config(cfg, world_size))
    return engine


def init_distributed(gpu: bool, master_addr: str, master_port: int, rank: int, world_size: int) -> None:
    """The learners' process group (NCCL on GPU, gloo on CPU), adopted by DeepSpeed, without
    the parts rayskd does not use."""
    import deepspeed

    from .distributed import init_process_group

    backend = "nccl" if gpu else "gloo"
    if not gpu:
        skip_cpu_shm_comm_op()
    skip_muon_import()
    init_process_group(backend, master_addr, master_port, rank, world_size)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)  # adopts the group
