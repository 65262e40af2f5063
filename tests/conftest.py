import os
import sys

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(ROOT)  # configs/ and demo_assets/ are relative to the project root


def engine_processes() -> set[int]:
    """vLLM's engine-core processes (GPU) and the rollout actors that host the engine in-process
    (CPU): none may outlive the run that started them."""
    out = set()
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            text = (p.info["name"] or "") + " ".join(p.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "EngineCore" in text or "ray::RolloutEngine" in text:
            out.add(p.info["pid"])
    return out


@pytest.fixture(scope="session")
def demo_assets():
    """The built-in demo, prepared once (cached in demo_assets/, as ./scripts/demo.sh does)."""
    from rayskd.data.demo import prepare_demo

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
