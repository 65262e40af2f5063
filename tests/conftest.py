import os
import sys

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(ROOT)  # configs/ and demo_assets/ are relative to the project root


WORKER = os.environ.get("PYTEST_XDIST_WORKER")


def ours(p: psutil.Process) -> bool:
    """Whether `p` belongs to this test process's runs. ./scripts/test.sh runs the tests in
    pytest-xdist workers side by side; every process a test starts (rayskd, its Ray cluster, the
    actors, vLLM's engine) inherits the worker's PYTEST_XDIST_WORKER, so a test that looks for
    processes (to kill one, or to find one left over) sees only its own worker's."""
    if WORKER is None:
        return True
    try:
        return p.environ().get("PYTEST_XDIST_WORKER") == WORKER
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def our_processes(*needles: str, since: float = 0.0) -> list[psutil.Process]:
    """This worker's processes (`ours`) whose name or command line contains one of `needles`,
    started at `since` or later."""
    out = []
    for p in psutil.process_iter(["pid", "name", "cmdline", "create_time"]):
        try:
            text = (p.info["name"] or "") + " ".join(p.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if (p.info["create_time"] or 0) >= since and any(n in text for n in needles) and ours(p):
            out.append(p)
    return out


def stop_ray_since(t0: float) -> None:
    """Stop the Ray cluster a test started with `ray start` at `t0` or later: its processes (this
    worker's only; `ray stop --force` would stop every cluster on the machine, other workers' too)."""
    import time

    victims = our_processes("ray", "gcs_server", "raylet", since=t0)
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)
    time.sleep(0.1)


def engine_processes() -> set[int]:
    """vLLM's engine-core processes (GPU) and the rollout actors that host the engine in-process
    (CPU): none may outlive the run that started them."""
    return {p.pid for p in our_processes("EngineCore", "ray::RolloutEngine")}


# the test files that take longest, longest first (seconds with two xdist workers on 2 cores,
# 2026-12-06: 750, 510, 355, 345, 320, 230, 155 ... 75): started first, so that the two workers
# finish together rather than one waiting for the other's last long file (the rest are shorter)
LONGEST_FIRST = ("test_resume.py", "test_architectures.py", "test_failures.py", "test_system.py",
                 "test_reliability.py", "test_gpu_check.py", "test_tensor_parallel.py", "test_run_dir.py",
                 "test_cluster.py", "test_elastic.py", "test_watching.py", "test_learner_ranks.py",
                 "test_weight_sync.py", "test_data_formats.py")


def pytest_collection_modifyitems(config, items):
    if "methods" not in (config.option.markexpr or ""):  # minutes of start-ups: asked for by name only
        skip = pytest.mark.skip(reason="every README method trained 2 steps: ./scripts/test.sh -m methods --dist load")
        for item in items:
            if item.get_closest_marker("methods") is not None:
                item.add_marker(skip)

    def rank(item):
        name = item.path.name
        return (LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST),
                item.get_closest_marker("slow") is None)

    items.sort(key=rank)


@pytest.fixture(scope="session")
def demo_assets():
    """The built-in demo, prepared once (cached in demo_assets/, as ./scripts/demo.sh does)."""
    from filelock import FileLock

    from rayskd.data.demo import prepare_demo

    with FileLock(os.path.join(ROOT, ".demo_assets.lock")):  # one xdist worker builds them, the others wait
        report = prepare_demo(os.path.join(ROOT, "demo_assets"), seed=0, log=lambda m: print(m, file=sys.stderr))
    return os.path.join(ROOT, "demo_assets"), report


@pytest.fixture
def no_leftover_engines():
    """Fails a test that leaves a vLLM engine process running."""
    import time

    before = engine_processes()
    yield
    deadline = time.time() + 30
    while (left := engine_processes() - before) and time.time() < deadline:
        time.sleep(1)
    assert not left, f"vLLM engine processes left running: {sorted(left)}"
