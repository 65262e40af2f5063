"""Runs reward functions in a separate, confined process, under a per-sample timeout.

One sample never costs more than itself: a function that raises, returns something that is
not a finite number, runs past `timeout_s`, overruns `max_memory_mb` or kills the process
scores 0 for that sample and is counted (`reward_errors`, `reward_timeouts`); after a crash
or hang the process is restarted and the rest of the batch is scored. Bools and numeric
types (int, numpy and torch scalars) count as numbers.

The process is confined: no Ray or CUDA variables in its environment, its own empty working
and home directory (so no Ray token: it cannot join the training cluster, which uses token
auth), a cap on its data memory, and a lower CPU priority than training. It runs as the same
user, so this keeps out mistakes (a library calling ray.init()), not a hostile function: run
untrusted reward code in a container.
"""
from __future__ import annotations

import logging
import math
import multiprocessing as mp
import numbers
import os
import signal
import tempfile

log = logging.getLogger(__name__)

# variables the reward process does not inherit: Ray's (cluster address, tokens, session),
# and the accelerators'
SCRUBBED_PREFIXES = ("RAY_", "RAYSKD_", "CUDA_", "NCCL_", "VLLM_", "MASTER_", "HF_TOKEN")
START_TIMEOUT_S = 120.0
MARGIN_S = 10.0  # the parent's wait per sample beyond timeout_s, before it declares a hang
MAX_LOGGED = 5  # bad samples described in the log per runner (all are counted)


class RewardError(RuntimeError):
    pass


class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Timeout()


def as_reward(value) -> float | None:
    """`value` as a finite float, or None when it is not a finite number."""
    if isinstance(value, (str, bytes)) or not (isinstance(value, numbers.Real) or hasattr(value, "__float__")):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError, RuntimeError):  # e.g. a tensor of more than one element
        return None
    return out if math.isfinite(out) else None


def _confine(max_memory_mb: int) -> None:
    """In the child, before any user code is imported."""
    for key in list(os.environ):
        if key.startswith(SCRUBBED_PREFIXES):
            del os.environ[key]
    home = os.path.expanduser("~")
    os.environ.setdefault("XDG_CACHE_HOME", os.path.join(home, ".cache"))  # downloaded models stay found
    os.environ.setdefault("HF_HOME", os.path.join(os.environ["XDG_CACHE_HOME"], "huggingface"))
    sandbox = tempfile.mkdtemp(prefix="rayskd-reward-")
    # Ray finds a local cluster's address by itself (its processes), but without the token in
    # ~/.ray/auth_token it cannot join a cluster that uses token auth (a local ray.init()
    # cluster does by default): a HOME of its own leaves a stray ray.init() outside
    os.environ["HOME"] = sandbox
    os.chdir(sandbox)
    if max_memory_mb > 0:
        import resource

        limit = max_memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:
        os.nice(5)
    except OSError:
        pass


def _child(conn, name, function, extra_path, max_memory_mb):
    import sys

    sys.path[:0] = [p for p in extra_path if p not in sys.path]
    _confine(max_memory_mb)
    from . import load_reward

    try:
        fn = load_reward(name, function)
        conn.send(("ready", None))
    except Exception as e:
        conn.send(("load_error", str(e)))
        return
    signal.signal(signal.SIGALRM, _on_alarm)
    while True:
        msg = conn.recv()
        if msg is None:
            return
        items, timeout_s = msg
        for prompt, completion, answer in items:  # one message per sample, as it is scored
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                value = fn(prompt, completion, answer)
                signal.setitimer(signal.ITIMER_REAL, 0)
                reward = as_reward(value)
                result = ("ok", reward) if reward is not None else \
                    ("error", f"returned {value!r} ({type(value).__name__}), not a finite number")
            except _Timeout:
                result = ("timeout", None)
            except MemoryError:
                result = ("error", f"ran out of memory (reward.max_memory_mb={max_memory_mb})")
            except Exception as e:  # the user's function raised: 0 for this sample
                result = ("error", f"{type(e).__name__}: {e}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            conn.send(result)


class RewardRunner:
    """Scores batches of samples in a child process. `score(items)` -> (rewards, stats)."""

    def __init__(self, name: str, function: str | None, timeout_s: float, extra_path: tuple[str, ...] = (),
                 max_memory_mb: int = 0, wait: bool = True):
        """`wait=False`: return once the child is started; it is waited for at the first use
        (or `wait_ready`), so its imports (a second or two of a core) overlap the caller's work."""
        self.name, self.function, self.timeout_s, self.extra_path = name, function, timeout_s, tuple(extra_path)
        self.max_memory_mb = max_memory_mb
        self.label = function or name
        self.logged = 0
        self.first_failure: str | None = None  # what the first failed sample of the last `score` call hit
        self._proc = None
        self._spawn()
        if wait:
            self.wait_ready()

    def _spawn(self):
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_child, args=(child_conn, self.name, self.function, self.extra_path,
                                                      self.max_memory_mb), daemon=True, name="rayskd-reward")
        self._proc.start()
        self._ready = False
        child_conn.close()  # ours is gone: the child's death shows as EOF here

    def wait_ready(self):
        """Wait until the child has loaded the reward function; RewardError if it could not."""
        if self._ready:
            return
        if not self._conn.poll(START_TIMEOUT_S):
            self.close()
            raise RewardError(f"reward {self.label}: the reward process did not start")
        try:
            kind, msg = self._conn.recv()
        except EOFError:
            self.close()
            raise RewardError(f"reward {self.label}: the reward process died while loading the function") from None
        if kind != "ready":
            self.close()
            raise RewardError(msg)
        self._ready = True

    def _note(self, what: str, item) -> None:
        """A sample scored 0 for `what`: remembered (the first of a `score` call) and logged."""
        if self.first_failure is None:
            self.first_failure = what
        if self.logged < MAX_LOGGED:
            self.logged += 1
            log.warning("reward %s scored a sample 0 (%s); completion %r", self.label, what, item[1][:80])

    def score(self, items: list[tuple[str, str, str]]) -> tuple[list[float], dict]:
        self.wait_ready()
        stats = {"reward_errors": 0, "reward_timeouts": 0}
        rewards: list[float] = []
        self.first_failure = None
        while len(rewards) < len(items):
            rest = items[len(rewards):]
            try:
                self._conn.send((rest, self.timeout_s))
            except (BrokenPipeError, ConnectionResetError, OSError):
                self._restart()
                continue
            for item in rest:
                try:
                    result = self._conn.recv() if self._conn.poll(self.timeout_s + MARGIN_S) else None
                except (EOFError, ConnectionResetError, OSError):
                    result = None
                if result is None:  # the process died or hung on this sample: 0, restart, go on
                    stats["reward_errors"] += 1
                    rewards.append(0.0)
                    self._note("the reward process died or hung", item)
                    self._restart()
                    break
                kind, value = result
                if kind == "ok":
                    rewards.append(value)
                    continue
                stats["reward_timeouts" if kind == "timeout" else "reward_errors"] += 1
                rewards.append(0.0)
                self._note(f"timed out after {self.timeout_s}s" if kind == "timeout" else value, item)
        return rewards, stats

    def check(self, items: list[tuple[str, str, str]]) -> None:
        """Before training: RewardError when the function fails on every one of `items`."""
        logged, self.logged = self.logged, MAX_LOGGED  # the error below says what went wrong
        _, stats = self.score(items)
        self.logged = logged
        if items and stats["reward_errors"] + stats["reward_timeouts"] == len(items):
            raise RewardError(f"reward {self.label} failed on all {len(items)} training rows it was tried on "
                              f"(completion = the reference answer): {self.first_failure}")

    def _restart(self):
        self.close()
        self._spawn()
        self.wait_ready()

    def close(self):
        if self._proc is not None:
            try:
                self._conn.send(None)
            except Exception:
                pass
            self._proc.join(timeout=2)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=5)
            self._proc = None

    def __del__(self):
        self.close()
