"""Runs reward functions in a separate process, under a per-sample timeout.

A function that raises, or runs past `timeout_s`, scores 0 for that sample and is counted; a
crash or hang of the whole process is contained (the process is restarted). A function that
returns something other than one finite float is a programming error: `RewardError` names it.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import signal


class RewardError(RuntimeError):
    pass


class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Timeout()


def _score_all(fn, items, timeout_s):
    """In the child: score each (prompt, completion, answer), returning ("ok", value),
    ("error", message) or ("timeout", None) per item."""
    out = []
    signal.signal(signal.SIGALRM, _on_alarm)
    for prompt, completion, answer in items:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            out.append(("ok", fn(prompt, completion, answer)))
        except _Timeout:
            out.append(("timeout", None))
        except Exception as e:  # the user's function raised: 0 for this sample
            out.append(("error", f"{type(e).__name__}: {e}"))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    return out


def _child(conn, name, function, extra_path):
    import sys

    sys.path[:0] = [p for p in extra_path if p not in sys.path]
    from . import load_reward

    try:
        fn = load_reward(name, function)
        conn.send(("ready", None))
    except Exception as e:
        conn.send(("load_error", str(e)))
        return
    while True:
        msg = conn.recv()
        if msg is None:
            return
        items, timeout_s = msg
        conn.send(("done", _score_all(fn, items, timeout_s)))


class RewardRunner:
    """Scores batches of samples in a child process. `score(items)` -> (rewards, stats)."""

    def __init__(self, name: str, function: str | None, timeout_s: float, extra_path: tuple[str, ...] = ()):
        self.name, self.function, self.timeout_s, self.extra_path = name, function, timeout_s, tuple(extra_path)
        self.label = function or name
        self._proc = None
        self._start()

    def _start(self):
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_child, args=(child_conn, self.name, self.function, self.extra_path),
                                 daemon=True, name="rayskd-reward")
        self._proc.start()
        if not self._conn.poll(120):
            self.close()
            raise RewardError(f"reward {self.label}: the reward process did not start")
        kind, msg = self._conn.recv()
        if kind != "ready":
            self.close()
            raise RewardError(msg)

    def score(self, items: list[tuple[str, str, str]]) -> tuple[list[float], dict]:
        stats = {"reward_errors": 0, "reward_timeouts": 0}
        if not items:
            return [], stats
        deadline = self.timeout_s * len(items) + 30.0
        try:
            self._conn.send((items, self.timeout_s))
            ready = self._conn.poll(deadline)
            results = self._conn.recv()[1] if ready else None
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            results = None
        if results is None:  # the process died or hung: restart it, score this batch 0
            self.close()
            self._start()
            stats["reward_errors"] += len(items)
            return [0.0] * len(items), stats
        rewards = []
        for kind, value in results:
            if kind == "timeout":
                stats["reward_timeouts"] += 1
                rewards.append(0.0)
            elif kind == "error":
                stats["reward_errors"] += 1
                rewards.append(0.0)
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise RewardError(f"reward function {self.label} must return one finite float per sample, "
                                      f"got {value!r}")
                rewards.append(float(value))
        return rewards, stats

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
