"""Moving the learner's weights into the rollout engines.

The learner serialises its full state dict with safetensors (no pickle) into the Ray object
store; each rollout engine loads the bytes inside its vLLM worker through
`WorkerExtension.rayskd_load_weights` (registered with `worker_extension_cls`, so no insecure
serialisation is needed) using vLLM's in-place `reload_weights`.
"""
from __future__ import annotations

import torch
from safetensors.torch import load, save

WORKER_EXTENSION = "rayskd.weight_sync.WorkerExtension"


def pack_weights(named_tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.detach().contiguous().cpu() for k, v in named_tensors.items()})


def unpack_weights(blob: bytes) -> dict[str, torch.Tensor]:
    return load(blob)


class WorkerExtension:
    """Mixed into vLLM's worker class; methods are called with `llm.collective_rpc`."""

    def rayskd_load_weights(self, blob: bytes) -> int:
        weights = unpack_weights(blob)
        self.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
        return len(weights)
