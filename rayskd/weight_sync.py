"""Moving the learner's weights into the rollout engines: tensors in buckets, behind one interface.

A push sends the student's parameters (each once: tied embeddings are one parameter, so the LM
head that shares the embedding's storage is not sent again) in the engines' dtype, packed into
flat buckets of at most `rollout.weight_bucket_mb` (no single message near a transport's limits;
under ZeRO-3 the learner ranks gather one bucket at a time). The `WeightLayout` (every name and
shape, which bucket it is in, and the dtype) is fixed at start, so a push moves only the buckets.
Each engine loads a push with one call of vLLM's in-place `reload_weights`, fed bucket by bucket,
inside its workers (`WorkerExtension`, vLLM's `worker_extension_cls`): one call, because vLLM
processes a fused layer (q, k and v in one matrix) once all its parts have arrived.

Two transports, one interface (`setup(engines)`, `push(engines, version)`, `rejoin(engines, i)`):
- `CollectiveSync`: learner rank 0 and every worker of every engine (each tensor-parallel rank)
  form a process group of their own, gloo on CPU and NCCL on GPU (the same code), and learner
  rank 0 broadcasts each bucket into the engines' workers;
- `ObjectStoreSync`: learner rank 0 puts the buckets into Ray's object store (one object per
  push, kept for engines that restart); each engine fetches them and hands them to its workers.
An engine whose load fails half-way exits (Ray restarts it and the rollout pool brings it back
to the version the others serve): it never serves samples from half-loaded weights. A
restarted engine gets the version the others serve, never newer weights the learner has made
since (the object store keeps the pushed buckets; the collective transport re-forms its group
and pushes again, which the pipeline does only when the learner is not in an update).

Checkpoints do not go through here: they read `Learner.full_state_dict()` directly.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch

WORKER_EXTENSION = "rayskd.weight_sync.WorkerExtension"
TRANSPORTS = ("auto", "collective", "object_store")


@dataclass(frozen=True)
class WeightLayout:
    """What a push moves: each bucket's (name, shape) pairs, in order, and the engines' dtype.
    Plain data (strings, ints, tuples), so it crosses every process boundary as it is."""
    dtype: str  # the engines' dtype, a torch dtype name: "float32", "bfloat16"
    buckets: tuple[tuple[tuple[str, tuple[int, ...]], ...], ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def numels(self) -> list[int]:
        return [sum(_numel(shape) for _, shape in bucket) for bucket in self.buckets]

    def nbytes(self) -> int:
        return sum(self.numels()) * torch.tensor([], dtype=self.torch_dtype).element_size()

    def plain(self) -> tuple:
        """(dtype, buckets): the arguments a worker method takes."""
        return self.dtype, self.buckets

    @classmethod
    def from_plain(cls, dtype: str, buckets) -> "WeightLayout":
        """From `plain()`, after a trip through a serialiser that turned tuples into lists."""
        return cls(dtype, tuple(tuple((name, tuple(shape)) for name, shape in bucket) for bucket in buckets))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def plan_layout(named_shapes: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, bucket_bytes: int) -> WeightLayout:
    """Buckets of consecutive tensors (the model's order: a layer's parts travel together) of
    at most `bucket_bytes` each; a tensor larger than that is a bucket of its own."""
    size = torch.tensor([], dtype=dtype).element_size()
    buckets, current, used = [], [], 0
    for name, shape in named_shapes:
        nbytes = _numel(shape) * size
        if current and used + nbytes > bucket_bytes:
            buckets.append(tuple(current))
            current, used = [], 0
        current.append((name, tuple(int(d) for d in shape)))
        used += nbytes
    if current:
        buckets.append(tuple(current))
    return WeightLayout(str(dtype).removeprefix("torch."), tuple(buckets))


def pack(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """One flat tensor of `tensors` in `dtype`, on their device."""
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])


def unpack(flat: torch.Tensor, bucket) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a packed bucket: views into `flat`, which must not be reused while vLLM
    may still hold them (it buffers a fused layer's parts until the last one arrives)."""
    start = 0
    for name, shape in bucket:
        n = _numel(shape)
        yield name, flat[start:start + n].view(shape)
        start += n


def to_numpy(flat: torch.Tensor):
    """A bucket as a numpy array, for Ray's zero-copy object store (numpy has no bfloat16: a
    16-bit dtype travels as int16 bits)."""
    flat = flat.detach().cpu()
    return (flat.view(torch.int16) if flat.element_size() == 2 else flat).numpy()


def from_numpy(array, dtype: torch.dtype) -> torch.Tensor:
    """`to_numpy`'s inverse (a read-only array from the object store: torch may warn, it is only
    read). Also takes the array's bytes: see `RolloutEngine.load_weights`."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array/buffer is not writable"
        if isinstance(array, (bytes, bytearray, memoryview)):
            return torch.frombuffer(array, dtype=dtype)
        t = torch.from_numpy(array)
    return t.view(dtype) if t.dtype != dtype else t


# ---- the collective transport's own process group ----

def listening_store(addr: str, port: int, world_size: int, is_master: bool, timeout: timedelta):
    """A torch TCPStore whose master listens on `addr` only: torch's own binds every interface,
    with no credentials, so the master binds the socket itself and hands it to the store."""
    import socket

    import torch.distributed as dist

    listen_fd = None
    if is_master:
        sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(max(128, world_size))
        listen_fd = sock.detach()
    return dist.TCPStore(addr, port, world_size, is_master, timeout, master_listen_fd=listen_fd)


class WeightGroup:
    """A process group of learner rank 0 (rank 0) and the engines' workers, apart from any other
    group of those processes (DeepSpeed's, vLLM's): gloo for CPU tensors, NCCL for CUDA ones."""

    def __init__(self, addr: str, port: int, rank: int, world_size: int, timeout_s: float, device: torch.device):
        import torch.distributed as dist

        timeout = timedelta(seconds=timeout_s)
        self.store = listening_store(addr, port, world_size, rank == 0, timeout)
        prefix = dist.PrefixStore("rayskd-weights", self.store)
        self.device, self.rank = device, rank
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(prefix, rank, world_size, options)
        else:
            self.group = dist.ProcessGroupGloo(prefix, rank, world_size, timeout)

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Rank 0's `tensor` into every rank's (same shape and dtype)."""
        self.group.broadcast(tensor, 0).wait()


class WorkerExtension:
    """Mixed into vLLM's worker class; its methods are called with `llm.collective_rpc`, once
    per worker (each tensor-parallel rank loads the whole tensors and keeps its shard). Besides
    the weight push: seeding a generate call's sampling (`rollout.call_seed`)."""

    def rayskd_seed(self, seed: int) -> None:
        """Seed the generator vLLM samples unseeded requests with (rollout.call_seed)."""
        torch.manual_seed(seed)

    def rayskd_join_weight_group(self, addr: str, port: int, first_rank: int, world_size: int,
                                 timeout_s: float) -> int:
        self.rayskd_weight_group = WeightGroup(addr, port, first_rank + self.rank, world_size, timeout_s, self.device)
        return self.rayskd_weight_group.rank

    def rayskd_receive(self, dtype: str, buckets) -> int:
        """One push over the collective transport: each bucket broadcast from learner rank 0.
        (The layout comes as plain data: vLLM serialises the arguments to its workers.)"""
        layout = WeightLayout.from_plain(dtype, buckets)
        group = self.rayskd_weight_group

        def buckets():
            for numel in layout.numels():
                flat = torch.empty(numel, dtype=layout.torch_dtype, device=self.device)  # new each time: see unpack
                group.broadcast(flat)
                yield flat

        return self._rayskd_reload(layout, buckets())

    def rayskd_load_buckets(self, flats: list, dtype: str, buckets) -> int:
        """One push through the object store: the buckets themselves (`to_numpy` arrays, or their bytes)."""
        layout = WeightLayout.from_plain(dtype, buckets)
        return self._rayskd_reload(layout, (from_numpy(f, layout.torch_dtype).to(self.device) for f in flats))

    def _rayskd_reload(self, layout: WeightLayout, flats) -> int:
        count = 0

        def tensors():
            nonlocal count
            for flat, bucket in zip(flats, layout.buckets, strict=True):
                for item in unpack(flat, bucket):
                    count += 1
                    yield item

        self.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)
        self._rayskd_refresh_tied_head()
        return count

    def _rayskd_refresh_tied_head(self) -> None:
        """A tied LM head shares the embedding's weight and is not loaded itself in a reload (its
        values arrive as the embedding's). vLLM on CPU multiplies by a packed copy of the head's
        weight, made when the weights load (`process_weights_after_loading`): without this the
        copy keeps the old values (measured: 3.6e-2 off in log-prob after one update of a tied
        Qwen2.5-shaped student). On GPU that step does nothing for the head."""
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        method, weight = getattr(head, "quant_method", None), getattr(head, "weight", None)
        if method is None or not isinstance(weight, torch.Tensor) or weight.numel() == 0:
            return
        tied = any(m is not head and isinstance(getattr(m, "weight", None), torch.Tensor)
                   and m.weight.data_ptr() == weight.data_ptr() for m in model.modules())
        if tied:
            method.process_weights_after_loading(head)


def exit_on_failure(what: str):
    """Around an engine's weight load: a load that fails half-way leaves the engine's weights
    half-updated; the process exits (Ray restarts it) rather than serve samples from them."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except BaseException as e:  # noqa: BLE001  (whatever stopped the load half-way)
            logging.getLogger(__name__).error("rayskd: %s failed (%s: %s); exiting so that Ray restarts this rollout "
                                              "worker with whole weights", what, type(e).__name__, e)
            os._exit(1)

    return guard()


# ---- the transports, as the rollout pool uses them ----

def choose_transport(cfg) -> str:
    """rollout.weight_transport of a rayskd Config, `auto` resolved: on GPUs the collective
    transport (NCCL), except where an engine may share learner rank 0's GPU (fractional GPUs on
    both: NCCL cannot join two ranks on one device); on CPU the object store, which measured
    faster than gloo over loopback (benchmarks/weight_push.json: 1.6 s against 2.3 s for 633 MiB)."""
    chosen = cfg.rollout.weight_transport
    if chosen != "auto":
        return chosen
    on_gpus = cfg.rollout.gpus_per_worker > 0 and cfg.learner.gpus_per_worker > 0
    shares_gpu = 0 < cfg.rollout.gpus_per_worker < 1 and 0 < cfg.learner.gpus_per_worker < 1
    return "collective" if on_gpus and not shares_gpu else "object_store"


class ObjectStoreSync:
    """Learner rank 0 packs the buckets (every rank takes part: ZeRO-3 gathers) into one object;
    each engine fetches it (Ray resolves the reference) and loads it."""
    name = "object_store"

    def __init__(self, learner_group, layout: WeightLayout):
        self.learner, self.layout = learner_group, layout
        self.version = 0
        self.payload = None  # object ref to the buckets of `version` (None: the initial weights)
        self.side_refs: list = []  # the other learner ranks' part in a push

    def setup(self, engines: list) -> None:
        """Nothing to form: the object store is there."""

    def push(self, engines: list, version: int) -> list:
        """Start loading the learner's current weights into every engine as `version`; returns
        one ref per engine (its `load_weights` call) for the caller to wait on."""
        self.version = version
        self.payload, *self.side_refs = self.learner.call("weight_buckets", self.layout)
        return [e.load_weights.remote(self.payload, self.layout, version) for e in engines]

    def rejoin(self, engines: list, i: int) -> None:
        """Bring restarted engine i (which holds the initial weights) to the pushed version."""
        import ray

        if self.payload is not None:
            ray.get(engines[i].load_weights.remote(self.payload, self.layout, self.version))


class CollectiveSync:
    """Learner rank 0 broadcasts each bucket over a process group it forms with every engine
    worker (`WeightGroup`). The group is formed at `setup` and again after an engine restarts."""
    name = "collective"

    def __init__(self, learner_group, layout: WeightLayout, engine_ranks: list[int], timeout_s: float):
        self.learner, self.layout, self.engine_ranks, self.timeout_s = learner_group, layout, engine_ranks, timeout_s
        self.version = 0
        self.side_refs: list = []  # the learner ranks' part in a push

    def setup(self, engines: list) -> None:
        """Form the group: learner rank 0 and each engine's workers, ranks in engine order."""
        import ray

        from .actors import rendezvous_address

        addr, port = rendezvous_address(self.learner.pg, 0)
        world = 1 + sum(self.engine_ranks)
        firsts = [1 + sum(self.engine_ranks[:i]) for i in range(len(engines))]
        joins = [self.learner.actors[0].join_weight_group.remote(addr, port, world, self.timeout_s)]
        joins += [e.join_weight_group.remote(addr, port, first, world, self.timeout_s)
                  for e, first in zip(engines, firsts)]
        ray.get(joins, timeout=self.timeout_s)

    def push(self, engines: list, version: int) -> list:
        self.version = version
        self.side_refs = self.learner.call("broadcast_weights", self.layout)
        return [e.receive_weights.remote(self.layout, version) for e in engines]

    def rejoin(self, engines: list, i: int) -> None:
        """A restarted engine: the group is formed again with every engine (each waits for its
        own restart) and the learner's weights pushed to all of them as the current version."""
        import ray

        self.setup(engines)
        if self.version:
            ray.get(self.push(engines, self.version) + self.side_refs, timeout=self.timeout_s)
