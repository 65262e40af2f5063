"""Where an actor's output goes: the actor group sets RAYSKD_LOG_FILE in each actor's
environment, and the plain classes call `log_to_file()` first in their constructors. Kept apart
from actors.py so that the plain classes import nothing of Ray's."""
from __future__ import annotations

import os

LOG_FILE_VAR = "RAYSKD_LOG_FILE"


def log_to_file() -> None:
    """Called first in each actor's constructor: when the actor group set a log file, point
    this process's stdout and stderr (file descriptors 1 and 2, so C++ and child processes
    too) at it, appended. What repeats per step (vLLM, DeepSpeed, Ray) stays off the console."""
    import sys

    path = os.environ.get(LOG_FILE_VAR)
    if not path:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
