"""Issue 25.2: an actor uses the GPUs Ray gave it and no others. Ray 2.60 sets
CUDA_VISIBLE_DEVICES for an actor it gives GPUs, but no longer hides them from one it gives
none: rayskd's actor groups hide them, so a role with gpus_per_worker=0 sees no GPU and the
plain classes (which pick cuda when they can see it) stay on the CPU."""
import pytest

pytestmark = pytest.mark.slow


def test_an_actor_given_no_gpu_sees_none():
    import ray

    from rayskd.actors import ActorGroup

    class Probe:  # (defined here: Ray ships it by value, the workers need not import this file)
        def seen(self):
            import os

            import torch

            return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_available()

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        group = ActorGroup("probe", Probe, 2, 0.5, 0, lambda i, pg: {}, env_vars={"X": "1"})
        try:
            assert ray.get(group.call("seen")) == [("", False), ("", False)]
        finally:
            group.kill()
    finally:
        ray.shutdown()
