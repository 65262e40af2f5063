"""The learner with a real DeepSpeed engine (one gloo rank, in this process) on the demo
student: empty responses are valid samples, a non-finite loss skips the update."""
import socket

import pytest
import torch

from rayskd.batch import RolloutShard, TeacherScores, batch_stats, pad_rows, summarize
from rayskd.learner import learner_shares

pytestmark = pytest.mark.slow


def free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 0], ids=["zero2", "zero0"])
def learner(request, demo_assets):
    """A learner at ZeRO-2 (DeepSpeed's ZeRO optimizer checks and reports the gradient norm) and
    at ZeRO-0 in fp32 (where DeepSpeed does neither, and rayskd's optimizer does both: a NaN
    gradient there was once applied, and the norm logged as NaN)."""
    import torch.distributed as dist

    from rayskd.config import load_config
    from rayskd.learner import Learner, LearnerSpec

    cfg = load_config("configs/demo.yaml", ["learner.world_size=1", "algorithm.prompts_per_step=2",
                                            "rollout.samples_per_prompt=2", "learner.micro_batch_size=2",
                                            "learner.lr=1e-3", f"learner.zero_stage={request.param}"])
    learner = Learner(LearnerSpec.from_config(cfg, 13), rank=0, world_size=1, master_addr="127.0.0.1",
                      master_port=free_port())
    yield learner
    # the next stage's learner, in this process, sets up its own group: DeepSpeed's cached
    # clones of the old one go with it
    from deepspeed.utils import groups

    dist.destroy_process_group()
    groups._WORLD_GROUP = groups._DATA_PARALLEL_GROUP = None


def train(learner, step, s, scores):
    """One update on the whole of shard `s` (one rank: its share is the batch)."""
    (share,) = learner_shares([summarize(s)], [s], [scores], 1, learner.algo, 6, 1.0, 0)
    return learner.train_step(share)


def shard(responses, rewards):
    prompts = [[0, 7, 10, 4, 5, 11]] * len(responses)
    n = len(responses)
    return RolloutShard(pad_rows(prompts), torch.tensor([6] * n), pad_rows(responses),
                        torch.tensor([len(r) for r in responses]), pad_rows([[-1.0] * len(r) for r in responses], 0.0,
                                                                          torch.float32),
                        torch.tensor(rewards), torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long), 2, 0)


def params(learner):
    return torch.cat([p.detach().flatten().clone() for p in learner.engine.module.parameters()])


def test_a_checkpoint_before_any_update_succeeded(learner, demo_assets, tmp_path):
    """Issue 26.3: a run can stop before any update succeeded (every one skipped as non-finite):
    the optimizer has no moments yet, and its checkpoint still writes and restores (zeros, step 0),
    where it once failed with a TypeError and left no checkpoint. (First in this file: the
    module's learner has made no update before it.)"""
    from safetensors.torch import load_file

    from rayskd.learner_state import read_meta

    s = shard([[0, 5, 2, 12], [0, 5, 3, 12], [0, 1, 12], [1, 12]], [1.0, 0.0, 0.0, 0.0])
    out = train(learner, 0, s, TeacherScores(logp_NR=torch.full((4, 4), float("nan"))))
    assert out.skipped
    learner.save_state(str(tmp_path), f"{demo_assets[0]}/student")
    assert read_meta(str(tmp_path))["step"] == 0
    state = load_file(tmp_path / "learner" / "state-00000.safetensors")
    assert all(float(v.abs().max()) == 0.0 for k, v in state.items() if k.endswith(("/exp_avg", "/exp_avg_sq")))
    learner.load_state(str(tmp_path))


def test_empty_response_is_a_valid_sample(learner):
    s = shard([[], [0, 5, 2, 12], [0, 5, 3, 12], [12]], [0.0, 1.0, 0.0, 0.0])
    scores = TeacherScores(logp_NR=torch.full((4, 4), -0.5) * s.response_mask_NR())
    before = params(learner)
    out = train(learner, 0, s, scores)
    assert not out.skipped and out.nonfinite == 0 and out.grad_norm > 0
    for key, value in vars(out).items():
        if isinstance(value, (int, float)):
            assert value == value and abs(value) != float("inf"), key
    assert batch_stats([summarize(s)])["empty_frac"] == 0.25
    assert (params(learner) - before).abs().max() > 0  # the update happened


def test_non_finite_loss_skips_the_update(learner):
    s = shard([[0, 5, 2, 12], [0, 5, 3, 12], [0, 1, 12], [1, 12]], [1.0, 0.0, 0.0, 0.0])
    scores = TeacherScores(logp_NR=torch.full((4, 4), float("nan")))
    before = params(learner)
    out = train(learner, 1, s, scores)
    assert out.skipped and out.nonfinite >= 1 and learner.engine.skipped_steps >= 1
    assert torch.equal(params(learner), before)  # weights untouched
    good = TeacherScores(logp_NR=torch.full((4, 4), -0.5) * s.response_mask_NR())
    out = train(learner, 2, s, good)  # and the next finite step trains normally
    assert not out.skipped and not torch.equal(params(learner), before)


def test_term_gradients_add_up_to_the_update(learner):
    """learner.log_term_grads (issue 30's ablation): the GRPO and teacher terms' batch gradients,
    logged as norms and a cosine, add up to the gradient the update used: |g_pg + g_kd|, from the
    three logged numbers, is the global norm the optimizer measured (so the extra backward passes
    left the update's own gradients alone: accumulated into them, the norm would differ)."""
    from dataclasses import replace

    s = shard([[0, 5, 2, 12], [0, 5, 3, 12], [0, 1, 12], [1, 12]], [1.0, 0.0, 1.0, 0.0])
    scores = TeacherScores(logp_NR=torch.full((4, 4), -0.5) * s.response_mask_NR())
    learner.cfg = replace(learner.cfg, log_term_grads=True)
    try:
        out = train(learner, 4, s, scores)
    finally:
        learner.cfg = replace(learner.cfg, log_term_grads=False)
    pg, kd, cosine = out.term_grads
    assert pg > 0 and kd > 0 and -1.0 <= cosine <= 1.0
    combined = (pg ** 2 + kd ** 2 + 2 * cosine * pg * kd) ** 0.5
    assert abs(combined - out.grad_norm) <= 1e-4 * out.grad_norm, (combined, out.grad_norm)
    record = out.record(learner.algo)
    assert (record["pg_grad_norm"], record["kd_grad_norm"], record["term_grad_cosine"]) == (pg, kd, cosine)
    assert "pg_grad_norm" not in train(learner, 5, s, scores).record(learner.algo)  # off: not logged


def test_deepspeed_trains_without_importing_muon(learner):
    """DeepSpeed's Muon (which torch.compiles its kernels when imported: ~2 s of start-up per
    rank) is replaced by stand-ins in the learner; the updates above ran through every ZeRO path
    that asks for it, and the stand-in refuses if anything ever tried to use it."""
    import sys

    from rayskd.deepspeed_setup import MUON_MODULES

    s = shard([[0, 5, 2, 12], [0, 5, 3, 12], [0, 1, 12], [1, 12]], [1.0, 0.0, 0.0, 0.0])
    train(learner, 3, s, TeacherScores(logp_NR=torch.full((4, 4), -0.5) * s.response_mask_NR()))
    for name in MUON_MODULES:
        assert sys.modules[name].__doc__.startswith("rayskd: a stand-in"), name
    with pytest.raises(RuntimeError, match="do not use DeepSpeed's Muon"):
        sys.modules[MUON_MODULES[1]].muon_update(None)
