"""Thin Ray shells around the plain classes: actor groups, resources and placement.

Each role (rollout, teacher, learner) is an ActorGroup: n actors of one plain class, each in
its own bundle of a placement group, so counts and GPU fractions are config values only.
Dispatch is explicit: `group.call("method", ...)` calls every actor, `group.call_each` each its
own arguments, `group.call_worker(i, ...)` every tensor-parallel rank of worker i.
"""
from __future__ import annotations

import itertools
import os
import socket

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .actor_logs import LOG_FILE_VAR


class PlacementError(RuntimeError):
    pass


class TrainingError(RuntimeError):
    """A run cannot go on (workers that keep failing, non-finite updates, a sync timeout).
    `restartable`: whether resuming from the newest checkpoint might get past it (an automatic
    restart, run.max_restarts); not for what the same data and weights would do again."""

    def __init__(self, message: str, restartable: bool = True):
        super().__init__(message)
        self.restartable = restartable


ROLES = {"Learner": "learner rank", "TeacherScorer": "teacher", "RolloutEngine": "rollout worker"}


def describe_failure(e: BaseException, tail: int = 8) -> str:
    """A failure as the console shows it, once and in its own words: the actor and method that
    raised, what it raised and the end of its traceback (Ray's wrapping left out); an actor whose
    constructor raised ("failed to start"); one that died at work, and why as far as Ray knows
    (killed or crashed, out of memory, its node lost)."""
    import re

    if not isinstance(e, (ray.exceptions.RayTaskError, ray.exceptions.RayActorError,
                          ray.exceptions.OutOfMemoryError, ray.exceptions.NodeDiedError)):
        return f"{type(e).__name__}: {e}"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # Ray colours the actor's name
    lines = [line for line in text.splitlines() if line.strip() and set(line.strip()) != {"^"}]
    where = re.search(r"ray::(?:[\w-]+:)?(\S+?)\(\)? \(pid=(\d+)", text)
    name = f"{where.group(1)} (pid {where.group(2)})" if where else "an actor"
    if isinstance(e, ray.exceptions.RayTaskError):
        cause = getattr(e, "cause", None) or e
        return f"{name} raised {type(cause).__name__}: {cause}\n" + "\n".join("    " + ln for ln in lines[1:][-tail:])
    if getattr(e, "actor_init_failed", False):  # its constructor raised: the traceback follows Ray's first line
        return f"{name} failed to start: {lines[-1]}\n" + "\n".join("    " + ln for ln in lines[1:][-tail:])
    return died(text)


def died(text: str) -> str:
    """One line for an actor that died at work, from the fields of Ray's message."""
    import re

    def field(key):
        m = re.search(rf"^\s*{key}: (\S+)", text, re.MULTILINE)
        return m.group(1) if m else None

    cls, pid, ip, actor = field("class_name"), field("pid"), field("ip"), field("name")
    rank = re.search(r"rayskd-\w+-(\d+)-", actor or "")
    who = f"{ROLES.get(cls, cls or 'an actor')}{f' {rank.group(1)}' if rank else ''}"
    where = ", ".join(x for x in (f"pid {pid}" if pid else "", f"on {ip}" if ip else "") if x)
    lower = text.lower()
    if any(x in lower for x in ("running low on memory", "out of memory", "outofmemoryerror", "memory pressure")):
        why = "was killed for using too much memory (OOM: Ray's memory monitor or the kernel's)"
    elif re.search(r"node .* (died|was terminated|was lost)|nodedied|preempt", lower):
        why = "was lost with its node"
    elif "never ran" in lower:
        why = "was cancelled before it started"
    else:
        exit_detail = re.search(r"Worker exit detail: ([^.]*\.)", text)
        why = "died: its process ended (killed, or crashed)" + (f": {exit_detail.group(1)}" if exit_detail else "")
    return f"{who} ({where}) {why}" if where else f"{who} {why}"


def bundle(num_cpus: float, num_gpus: float, resources: dict | None = None) -> dict:
    b = {"CPU": num_cpus, **(resources or {})}
    if num_gpus > 0:
        b["GPU"] = num_gpus
    return b


GROUP_IDS = itertools.count()


class ActorGroup:
    def __init__(self, name: str, cls, n: int, num_cpus: float, num_gpus: float, args_for, *,
                 resources: dict | None = None, env_vars: dict | None = None, max_restarts: int = 0,
                 task_retries: int = 0, ready_timeout_s: float = 600.0, log_dir: str | None = None,
                 ranks_per_worker: int = 1):
        """`args_for(i, pg)` returns the keyword arguments of actor i's constructor (pg: this
        group's placement group, ready). With `log_dir`, actor i's output (its own, vLLM's,
        DeepSpeed's, its child processes') goes to LOG_DIR/NAME_i.log (see log_to_file).
        `ranks_per_worker` > 1: every consecutive `ranks_per_worker` actors are the
        tensor-parallel ranks of one worker (`call_worker`)."""
        self.name, self.n, self.log_dir, self.ranks_per_worker = name, n, log_dir, ranks_per_worker
        resources = {k: v for k, v in (resources or {}).items() if v > 0}  # 0: not required
        tag = f"{os.getpid()}-{next(GROUP_IDS)}"  # unique in this process: a role may have several groups
        self.pg = placement_group([bundle(num_cpus, num_gpus, resources)] * n, strategy="PACK",
                                  name=f"rayskd-{name}-{tag}")
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
                max_task_retries=task_retries, name=f"rayskd-{name}-{i}-{tag}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                runtime_env=self._runtime_env(env_vars, log_dir, i, num_gpus),
            ).remote(**args_for(i, self.pg))
            for i in range(n)
        ]

    def log_file(self, i: int) -> str:
        """Where actor i's output is, for messages."""
        return os.path.join(self.log_dir, f"{self.name}_{i}.log") if self.log_dir else "the Ray session's logs"

    def _runtime_env(self, env_vars: dict | None, log_dir: str | None, i: int, num_gpus: float) -> dict | None:
        env = dict(env_vars or {})
        if log_dir:
            env[LOG_FILE_VAR] = self.log_file(i)
        if num_gpus == 0:
            # an actor uses exactly the GPUs Ray gave it: Ray sets CUDA_VISIBLE_DEVICES for those it
            # gives some, but no longer hides the GPUs from one it gives none (it would land on GPU 0
            # uncounted, beside whatever Ray placed there)
            env["CUDA_VISIBLE_DEVICES"] = ""
        return {"env_vars": env} if env else None

    def nodes(self) -> list[str]:
        """The Ray node id each actor's bundle was placed on."""
        table = ray.util.placement_group_table(self.pg)
        return [table["bundles_to_node_id"][i] for i in range(self.n)]

    def call(self, method: str, *args, **kwargs) -> list:
        """Call `method` on every actor; returns the object refs."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def call_each(self, method: str, args: list[tuple]) -> list:
        """Call `method(*args[i])` on actor i; returns the object refs (Ray resolves refs among
        the arguments before the call)."""
        return [getattr(a, method).remote(*x) for a, x in zip(self.actors, args, strict=True)]

    @property
    def workers(self) -> int:
        """Workers, each `ranks_per_worker` actors (tensor-parallel ranks)."""
        return self.n // self.ranks_per_worker

    def call_worker(self, i: int, method: str, *args):
        """Call `method` on every rank of worker i (they act together); returns rank 0's ref."""
        ranks = self.actors[i * self.ranks_per_worker:(i + 1) * self.ranks_per_worker]
        return [getattr(a, method).remote(*args) for a in ranks][0]

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


def init_ray(actors: int) -> bool:
    """Join the cluster at RAY_ADDRESS, or start a local one with a CPU per actor at least.
    True when this process started Ray (and so shuts it down)."""
    if ray.is_initialized():
        return False
    # the actors' output goes to their log files (log_to_file), not the driver's console
    if os.environ.get("RAY_ADDRESS"):
        global WORKDIR
        WORKDIR = os.getcwd()
        ray.init(log_to_driver=False)
        _stand_somewhere()
        return False
    # no idle workers started ahead: each actor gets a process of its own anyway (its runtime
    # env differs), so they would only compete with the actors' start-up (~0.6 s of a core each)
    # token authentication is Ray 2.60's default (RAY_AUTH_MODE unset): gcs_server, the raylet and
    # every worker's gRPC port listen on every interface whatever the node address, so the token is
    # what keeps them closed (Ray reads RAY_AUTH_MODE when it is imported: it is not ours to set here)
    # address "local": a cluster of its own even where `ray start` left one on this machine (with
    # no address Ray would join that one, which is not what RAY_ADDRESS unset means here)
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, actors), include_dashboard=False, log_to_driver=False,
             _system_config={"prestart_worker_first_driver": False, "enable_worker_prestart": False})
    protect_token()
    return True


WORKDIR: str | None = None  # the directory this driver started in (`workdir`)


def workdir() -> str:
    """Where a user's reward module is imported from: the directory the driver started in."""
    return WORKDIR or os.getcwd()


def _stand_somewhere() -> None:
    """Where this process is a Ray job's entrypoint, its working directory is the job's unpacked
    working_dir package, and joining the cluster (ray.init) can have Ray's runtime-env agent
    delete that directory (os.getcwd() then fails: test_cluster hit it in every run of one
    commit, Ray 2.60). The run's paths are absolute by then (load_config) and each actor gets
    its own copy of the package, so the driver only needs some directory to stand in: the same
    path if Ray put it back, else the home directory."""
    try:
        os.getcwd()
    except FileNotFoundError:
        os.chdir(WORKDIR if WORKDIR and os.path.isdir(WORKDIR) else os.path.expanduser("~"))


def protect_token() -> None:
    """Ray writes its authentication token readable by everyone (mode 644): its owner's only."""
    path = os.path.expanduser("~/.ray/auth_token")
    if os.path.exists(path):
        os.chmod(path, 0o600)


def ray_processes() -> list[tuple[int, float]]:
    """(pid, start time) of the Ray processes this driver started (its local cluster)."""
    import psutil

    return [(p.pid, p.create_time()) for p in psutil.Process().children(recursive=True)]


def kill_processes(recorded: list[tuple[int, float]]) -> int:
    """SIGKILL the recorded processes still alive (the same pid and start time, so a reused pid
    is never hit); returns how many."""
    import signal

    import psutil

    killed = 0
    for pid, started in recorded:
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - started) < 1e-3:
                p.send_signal(signal.SIGKILL)
                killed += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return killed


def actor_env(cfg) -> dict:
    """Environment variables of every actor of a run (`cfg`: a rayskd Config)."""
    return {"TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": str(cfg.rollout.cpu_kv_cache_gb),
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            # vLLM's INFO lines drown the progress; set VLLM_LOGGING_LEVEL=INFO to see them
            "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}


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


def start_learners(cfg, tokenizer_len: int, env_vars: dict | None = None, log_dir: str | None = None) -> ActorGroup:
    """The learner ranks of `cfg` (a rayskd Config) as one group, in two explicit steps: place
    the group and take the rendezvous address on rank 0's node, then start every rank on it."""
    from .learner import Learner, LearnerSpec

    spec, master = LearnerSpec.from_config(cfg, tokenizer_len), {}

    def learner_kwargs(rank, pg):
        if not master:  # the first rank: its bundle is placed, so its node is known
            master["master_addr"], master["master_port"] = rendezvous_address(pg, 0)
        return dict(spec=spec, rank=rank, world_size=cfg.learner.world_size, **master)

    return ActorGroup("learner", Learner, cfg.learner.world_size, 1, cfg.learner.gpus_per_worker, learner_kwargs,
                      resources=dict(cfg.learner.resources), env_vars=env_vars, log_dir=log_dir)


def start_teachers(cfg, tokenizer_len: int, env_vars: dict | None = None, log_dir: str | None = None,
                   max_restarts: int = 0, golden: bool = False, index: int = 0) -> ActorGroup:
    """The workers of teacher `index` of `cfg` (a rayskd Config: 0 is teacher.path, i is
    teacher.others[i - 1]); `golden`: one worker of the golden model (teacher.golden_path) with
    the teacher's settings. A worker of one rank holds no state: Ray
    restarts it (`max_restarts`) and re-runs its call. The ranks of a tensor-parallel worker
    share a process group that a restarted rank could not rejoin, so they are not restarted:
    a failure stops the run, which checkpoints first."""
    import dataclasses

    from .teacher import TeacherScorer

    t, tp = cfg.teacher, cfg.teacher.tensor_parallel_size
    if golden:
        t = dataclasses.replace(t, path=t.golden_path, num_workers=1)
    elif index:
        t = dataclasses.replace(t, path=t.others[index - 1])
    masters: dict[int, tuple[str, int]] = {}

    def teacher_kwargs(i, pg):
        rank, first = i % tp, i - i % tp
        if tp > 1 and first not in masters:  # each worker's rank 0: its bundle is placed, so its node is known
            masters[first] = rendezvous_address(pg, first)
        addr, port = masters.get(first, (None, None))
        return dict(model_path=t.path, cfg=t, tokenizer_len=tokenizer_len, rank=rank, worker=i // tp, master_addr=addr,
                    master_port=port, teacher=index)

    retries = max_restarts if tp == 1 else 0
    name = "golden" if golden else f"teacher{index}" if index else "teacher"
    return ActorGroup(name, TeacherScorer, t.num_workers * tp, 1, t.gpus_per_worker / tp, teacher_kwargs,
                      resources=dict(t.resources), env_vars=env_vars, max_restarts=retries, task_retries=retries,
                      log_dir=log_dir, ranks_per_worker=tp)
