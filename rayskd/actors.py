"""Thin Ray shells around the plain classes: actor groups, resources and placement.

Each role (rollout, teacher, learner) is an ActorGroup: n actors of one plain class, each in
its own bundle of a placement group, so counts and GPU fractions are config values only.
Dispatch is explicit: `group.call("method", ...)` calls every actor, `group.actors[i]` one.
"""
from __future__ import annotations

import os
import socket

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class PlacementError(RuntimeError):
    pass


class TrainingError(RuntimeError):
    """A run cannot go on (workers that keep failing, non-finite updates, a sync timeout)."""


def bundle(num_cpus: float, num_gpus: float, resources: dict | None = None) -> dict:
    b = {"CPU": num_cpus, **(resources or {})}
    if num_gpus > 0:
        b["GPU"] = num_gpus
    return b


class ActorGroup:
    def __init__(self, name: str, cls, n: int, num_cpus: float, num_gpus: float, args_for, *,
                 resources: dict | None = None, env_vars: dict | None = None, max_restarts: int = 0,
                 task_retries: int = 0, ready_timeout_s: float = 600.0):
        """`args_for(i, pg)` returns the keyword arguments of actor i's constructor (pg: this
        group's placement group, ready)."""
        self.name, self.n = name, n
        self.pg = placement_group([bundle(num_cpus, num_gpus, resources)] * n, strategy="PACK",
                                  name=f"rayskd-{name}-{os.getpid()}")
        ready, _ = ray.wait([self.pg.ready()], timeout=ready_timeout_s)
        if not ready:
            remove_placement_group(self.pg)
            raise PlacementError(
                f"{name}: the cluster cannot place {n} x {bundle(num_cpus, num_gpus, resources)} within "
                f"{ready_timeout_s:.0f}s; lower {name}.num_workers / gpus_per_worker or add nodes "
                f"(available: {ray.available_resources()})")
        remote_cls = ray.remote(cls)
        self.actors = [
            remote_cls.options(
                num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None, max_restarts=max_restarts,
                max_task_retries=task_retries, name=f"rayskd-{name}-{i}-{os.getpid()}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                runtime_env={"env_vars": env_vars} if env_vars else None,
            ).remote(**args_for(i, self.pg))
            for i in range(n)
        ]

    def nodes(self) -> list[str]:
        """The Ray node id each actor's bundle was placed on."""
        table = ray.util.placement_group_table(self.pg)
        return [table["bundles_to_node_id"][i] for i in range(self.n)]

    def call(self, method: str, *args, **kwargs) -> list:
        """Call `method` on every actor; returns the object refs."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def call_each(self, method: str, args: list) -> list:
        """Call `method(args[i])` on actor i; returns the object refs."""
        return [getattr(a, method).remote(x) for a, x in zip(self.actors, args, strict=True)]

    def kill(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        try:
            remove_placement_group(self.pg)
        except Exception:
            pass


def _node_address() -> tuple[str, int]:
    with socket.socket() as s:
        s.bind((ray.util.get_node_ip_address(), 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def rendezvous_address(pg, bundle_index: int = 0) -> tuple[str, int]:
    """IP and a free port on the node of a placement-group bundle (the learners' rank 0)."""
    fn = ray.remote(num_cpus=0)(_node_address).options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle_index))
    return ray.get(fn.remote())


def start_learners(cfg, tokenizer_len: int, env_vars: dict | None = None) -> ActorGroup:
    """The learner ranks of `cfg` (a rayskd Config) as one group, in two explicit steps: place
    the group and take the rendezvous address on rank 0's node, then start every rank on it."""
    from .learner import Learner, LearnerSpec

    spec, master = LearnerSpec.from_config(cfg, tokenizer_len), {}

    def learner_kwargs(rank, pg):
        if not master:  # the first rank: its bundle is placed, so its node is known
            master["master_addr"], master["master_port"] = rendezvous_address(pg, 0)
        return dict(spec=spec, rank=rank, world_size=cfg.learner.world_size, **master)

    return ActorGroup("learner", Learner, cfg.learner.world_size, 1, cfg.learner.gpus_per_worker, learner_kwargs,
                      resources=dict(cfg.learner.resources), env_vars=env_vars)
