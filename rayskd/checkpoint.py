"""Run directory and checkpoints: atomic save, find the newest complete one, prune old ones.

Layout: RUN_DIR/checkpoints/step_000042/
    hf/                        the student as a Hugging Face checkpoint (config, tokenizer, safetensors)
    learner/                   the learners' training state, whole tensors by parameter name (fp32
                               master weights, Adam moments), step, scheduler, counters, RNG: any
                               number of ranks at any ZeRO stage resumes it (learner_state.py)
    pending_rollouts.safetensors samples already drawn for the next steps (max_staleness >= 1)
    trainer.json               driver state: step, sampler, weights version, rehearsal position
    MANIFEST.json              size and SHA-256 of every file above
    COMPLETE                   written last, inside the temporary directory
A checkpoint is written under step_000042.tmp and renamed into place only when complete;
a crash mid-write leaves a .tmp directory that is never read and is removed next time.
Older checkpoints are deleted only after the new one is committed. Before a resume uses a
checkpoint its files are checked against the manifest; a damaged one (a truncated file, a
missing rank file) is passed over for the newest intact one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

STEP_DIR = re.compile(r"^step_(\d{6,})$")
MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def staging_dir(run_dir: str, step: int) -> str:
    """Where a checkpoint of `step` is written before it is committed (never a new run
    directory: one that vanished mid-run is an error, not recreated empty)."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"the run directory {run_dir} is gone")
    path = os.path.join(checkpoints_dir(run_dir), f"step_{step:06d}.tmp")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(run_dir: str, step: int, trainer_state: dict, keep: int) -> str:
    """Write the driver's state and the marker, then atomically rename into place and prune."""
    tmp = os.path.join(checkpoints_dir(run_dir), f"step_{step:06d}.tmp")
    with open(os.path.join(tmp, "trainer.json"), "w") as f:
        json.dump(trainer_state, f)
        f.flush()
        os.fsync(f.fileno())
    files = manifest(tmp)
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(files, f)
        f.flush()
        os.fsync(f.fileno())
    with open(os.path.join(tmp, MARKER), "w") as f:
        f.write(str(step))
        f.flush()
        os.fsync(f.fileno())
    final = os.path.join(checkpoints_dir(run_dir), f"step_{step:06d}")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    _fsync_dir(checkpoints_dir(run_dir))
    prune(run_dir, keep)
    return final


def complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    root = checkpoints_dir(run_dir)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, MARKER)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def manifest(directory: str) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file under `directory`."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, directory)] = [os.path.getsize(path), _sha256(path)]
    return out


def verify(path: str) -> str | None:
    """What is wrong with the checkpoint at `path` (None: intact). Sizes first, then checksums."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            files = json.load(f)
    except (OSError, ValueError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__})"
    for rel, (size, _) in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full)} bytes, {size} were written"
    for rel, (_, digest) in files.items():
        if _sha256(os.path.join(path, rel)) != digest:
            return f"{rel} does not match its checksum"
    return None


def newest_intact(run_dir: str) -> tuple[tuple[int, str] | None, list[tuple[str, str]]]:
    """The newest complete checkpoint whose files match its manifest, and the newer ones
    passed over with what is wrong with each."""
    damaged = []
    for step, path in reversed(complete_checkpoints(run_dir)):
        problem = verify(path)
        if problem is None:
            return (step, path), damaged
        damaged.append((path, problem))
    return None, damaged


def latest(run_dir: str) -> tuple[int, str] | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def prune(run_dir: str, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and stale .tmp dirs. An old
    one is renamed to .tmp before it is deleted, so that a deletion cut short (a kill, the
    directory moved away) never leaves a half-deleted step_N directory beside the whole ones."""
    for _, path in complete_checkpoints(run_dir)[:-keep]:
        try:
            os.rename(path, path + ".tmp")
        except OSError:
            continue
        shutil.rmtree(path + ".tmp", ignore_errors=True)
    root = checkpoints_dir(run_dir)
    newest = latest(run_dir)
    for name in os.listdir(root):
        if name.endswith(".tmp") and (newest is None or int(name[5:-4]) <= newest[0]):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load_trainer_state(path: str) -> dict:
    with open(os.path.join(path, "trainer.json")) as f:
        return json.load(f)


LOCK_FILE = ".rayskd.lock"


class RunInUse(Exception):
    """Another live process holds the run directory."""


class RunLock:
    """RUN_DIR is one run's, trained by one process at a time: an exclusive flock on
    RUN_DIR/.rayskd.lock, held for the life of the process that trains there. The operating
    system releases it when that process ends, however it ends (kill -9 included), so a stale
    lock never blocks a resume. The file says who holds it, for the message of the one refused."""

    def __init__(self, run_dir: str):
        import fcntl
        import socket
        import time

        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise RunInUse(holder) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # (closing the descriptor drops the flock)
            self.fd = None
