"""Submitting runs to a Ray cluster as Ray jobs (Ray Jobs SDK), and following them.

The config is validated here first (bad input exits 2 before anything is submitted). The
job runs `python -m rayskd train CONFIG ...` in a copy of the current directory
(runtime_env working_dir), so relative paths in the config resolve as they do locally.
Token authentication (RAY_AUTH_MODE=token) is handled by the SDK from the environment.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time

# never shipped to the cluster: environments, run outputs, VCS and caches
EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", ".pytest_cache", ".gpuwheels", ".whl"]
PASSED_ENV = ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "VLLM_CPU_KVCACHE_SPACE", "RAY_AUTH_MODE")
AGENT_WAIT_S = 60  # for the job agent of a cluster that has just started


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        from .preflight import UsageError

        raise UsageError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    return JobSubmissionClient(address)


def submit(address: str | None, config_path: str, overrides: list[str], working_dir: str = ".") -> str:
    from .config import PATH_KEYS, get_key, load_config

    cfg = load_config(config_path, overrides)  # validate before submitting: ConfigError -> exit 2
    # Models, data and the run directory are not shipped with the code (and Ray's upload skips
    # .gitignore'd files): pass them as absolute paths, which must be visible to the cluster's
    # nodes (shared storage, or a head on this machine).
    overrides = list(overrides) + [f"{key}={get_key(cfg, key)}" for key in PATH_KEYS
                                   if get_key(cfg, key) and os.path.exists(get_key(cfg, key))]
    if cfg.teacher.others:
        overrides.append(f"teacher.others=[{','.join(cfg.teacher.others)}]")
    if not any(o.startswith("run.output_dir=") for o in overrides):
        overrides.append(f"run.output_dir={cfg.run.output_dir}")
    rel = os.path.relpath(os.path.abspath(config_path), os.path.abspath(working_dir))
    if rel.startswith(".."):
        from .preflight import UsageError

        raise UsageError(f"{config_path} is outside the working directory {working_dir} that is shipped to the cluster")
    entrypoint = " ".join(["python", "-m", "rayskd", "train", shlex.quote(rel), *map(shlex.quote, overrides)])
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    runtime_env = {"working_dir": working_dir, "excludes": EXCLUDES, "env_vars": env}
    c = client(address)
    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            return c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata={"tool": "rayskd", "config": rel})
        except RuntimeError as e:  # a cluster just started: its job agent comes up seconds after the dashboard
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(1.0)


def follow(address: str | None, job_id: str, out=sys.stdout) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    c = client(address)

    async def tail():
        async for lines in c.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    return wait(address, job_id, timeout_s=60)


def wait(address: str | None, job_id: str, timeout_s: float = 3600) -> str:
    c = client(address)
    deadline = time.time() + timeout_s
    while True:
        job_status = c.get_job_status(job_id)
        status = str(getattr(job_status, "value", job_status))
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or time.time() > deadline:
            return status
        time.sleep(1.0)


def status(address: str | None, job_id: str) -> str:
    info = client(address).get_job_info(job_id)
    return f"{job_id}: {getattr(info.status, 'value', info.status)}" + (
        f" ({info.message})" if info.message else "")


def logs(address: str | None, job_id: str) -> str:
    return client(address).get_job_logs(job_id)


def stop(address: str | None, job_id: str) -> bool:
    """Ask the job to stop: Ray sends SIGTERM, rayskd checkpoints after the current step."""
    return client(address).stop_job(job_id)
