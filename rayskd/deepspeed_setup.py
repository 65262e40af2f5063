"""DeepSpeed for the learners: the engine's config, and the two DeepSpeed parts rayskd goes
without (each measured as start-up time a learner rank spent for nothing). Imported by the
learner only, inside its constructor."""
from __future__ import annotations

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
        # the update on every rank (Learner.train_step)
        "gradient_clipping": cfg.grad_clip if cfg.grad_clip > 0 else 1e12,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


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
