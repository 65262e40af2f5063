"""Moving the learner's weights into the rollout engines, behind one interface.

`ObjectStoreSync` is what the trainer and the rollout pool use: `push` a new version to every
engine, `rejoin` a restarted engine (it gets the version the others serve, never newer weights
the learner has made since). Its transport: learner
rank 0 serialises the full state dict with safetensors (no pickle) into the Ray object store;
each engine loads the bytes inside its vLLM worker through `WorkerExtension.rayskd_load_weights`
(registered with `worker_extension_cls`, so no insecure serialisation is needed) using vLLM's
in-place `reload_weights`. A collective transport (NCCL broadcast from the learner into the
engines on GPUs) would implement the same two methods.

Checkpoints do not go through here: they read `Learner.full_state_dict()` directly.
"""
from __future__ import annotations

import torch
from safetensors.torch import load, save

WORKER_EXTENSION = "rayskd.weight_sync.WorkerExtension"


def pack_weights(named_tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.detach().contiguous().cpu() for k, v in named_tensors.items()})


def unpack_weights(blob: bytes) -> dict[str, torch.Tensor]:
    return load(blob)


class ObjectStoreSync:
    def __init__(self, learner_group):
        self.learner = learner_group
        self.version = 0
        self.payload = None  # object ref to the bytes of `version` (None: the initial weights)

    def push(self, engines: list, version: int) -> list:
        """Start loading the learner's current weights into every engine as `version`; returns
        one ref per engine (its `load_weights` call) for the caller to wait on."""
        self.version = version
        # every rank takes part (ZeRO-3 gathers the weights); rank 0 returns the bytes
        self.payload = self.learner.call("sync_payload")[0]
        return [e.load_weights.remote(self.payload, version) for e in engines]

    def rejoin(self, engine) -> None:
        """Bring a restarted engine (which holds the initial weights) to the pushed version."""
        import ray

        if self.payload is not None:
            ray.get(engine.load_weights.remote(self.payload, self.version))


class WorkerExtension:
    """Mixed into vLLM's worker class; methods are called with `llm.collective_rpc`."""

    def rayskd_load_weights(self, blob: bytes) -> int:
        weights = unpack_weights(blob)
        self.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
        return len(weights)
