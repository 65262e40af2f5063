"""The weight push (rayskd/weight_sync.py): the bucket layout, and pushes with the real parts —
a DeepSpeed learner rank and vLLM engines in Ray actors — through both transports, into two
engines of which one is tensor parallel, in buckets far smaller than the model: afterwards every
engine's log-probs equal the learner's."""
import pytest
import torch

from rayskd.weight_sync import WeightLayout, pack, plan_layout, unpack


def test_buckets_keep_order_and_size_and_unpack_to_the_tensors():
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(3 + i, 5, generator=g) for i in range(6)}
    tensors["big"] = torch.randn(40, 10, generator=g)  # larger than a bucket: a bucket of its own
    layout = plan_layout([(k, v.shape) for k, v in tensors.items()], torch.bfloat16, bucket_bytes=100)
    assert [name for bucket in layout.buckets for name, _ in bucket] == list(tensors)  # the model's order
    sizes = [n * 2 for n in layout.numels()]
    assert all(size <= 100 for size, bucket in zip(sizes, layout.buckets) if len(bucket) > 1)
    assert ("big", (40, 10)) in [b[0] for b in layout.buckets if len(b) == 1]
    assert layout.nbytes() == sum(v.numel() for v in tensors.values()) * 2
    for bucket in layout.buckets:
        flat = pack([tensors[name] for name, _ in bucket], torch.bfloat16)
        assert flat.dtype == torch.bfloat16 and flat.numel() == sum(tensors[n].numel() for n, _ in bucket)
        for name, view in unpack(flat, bucket):
            assert torch.equal(view, tensors[name].to(torch.bfloat16))
    # plain data survives a serialiser that turns tuples into lists (vLLM's, to its workers)
    plain = [[[name, list(shape)] for name, shape in bucket] for bucket in layout.buckets]
    assert WeightLayout.from_plain(layout.dtype, plain) == layout


def test_tied_embeddings_are_pushed_once():
    """A tied LM head is the embedding's parameter: the push names it once, under the
    embedding's name (vLLM ties the head itself), where a state dict names it twice."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2", hidden_size=64, intermediate_size=128, num_attention_heads=1,
                                  num_key_value_heads=1, num_hidden_layers=1, vocab_size=32, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    names = [name for name, _ in model.named_parameters()]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert "lm_head.weight" in model.state_dict()


@pytest.mark.slow
def test_both_transports_push_into_a_plain_and_a_tensor_parallel_engine(demo_assets, no_leftover_engines):
    """One learner rank trains an update; its weights are pushed in buckets of 64 KiB (the demo
    student is ~1.2 MiB: 20 buckets) into two engines, one of them over two tensor-parallel
    ranks, by the collective transport (gloo: learner rank 0 and three engine workers) and by
    the object store. Each time both engines' log-probs of a fixed sequence equal the learner's,
    and differ from the initial student's."""
    import ray
    from transformers import AutoTokenizer

    from rayskd.actors import actor_env, start_learners
    from rayskd.batch import RolloutShard, TeacherScores, pad_rows, summarize
    from rayskd.config import load_config
    from rayskd.learner import learner_shares
    from rayskd.rollout_pool import start_rollout
    from rayskd.weight_sync import CollectiveSync, ObjectStoreSync

    assets, _ = demo_assets
    tok = AutoTokenizer.from_pretrained(f"{assets}/student")
    base = [f"student.path={assets}/student", "learner.world_size=1", "learner.lr=1e-2", "rollout.weight_bucket_mb=1"]
    cfgs = [load_config("configs/demo.yaml", [*base, f"rollout.tensor_parallel_size={tp}"]) for tp in (1, 2)]
    seq = [1, 2, 3, 4, 5, 6, tok.eos_token_id]
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    groups = []
    try:
        learner = start_learners(cfgs[0], len(tok), actor_env(cfgs[0]))
        groups.append(learner)
        for cfg in cfgs:
            groups.append(start_rollout(cfg, cfg.student.path, 32, actor_env(cfg)))
        engines = [g.actors[0] for g in groups[1:]]
        initial = ray.get(engines[0].sequence_logprobs.remote(seq))
        layout = ray.get(learner.actors[0].weight_layout.remote("float32", 64 << 10))
        assert len(layout.buckets) >= 15

        # an update, so that the learner's weights are not the engines' initial ones
        n = 4
        shard = RolloutShard(pad_rows([[0, 7, 10, 4, 5, 11]] * n), torch.tensor([6] * n), pad_rows([[0, 5, 2, 12]] * n),
                             torch.tensor([4] * n), torch.full((n, 4), -1.0), torch.tensor([1.0, 0.0, 1.0, 0.0]),
                             torch.zeros(n, dtype=torch.bool), torch.tensor([0, 0, 1, 1]), 2, 0)
        scores = TeacherScores(logp_NR=torch.full((n, 4), -0.5))
        (share,) = learner_shares([summarize(shard)], [shard], [scores], 1, cfgs[0].algorithm, 6, 1.0, 0)
        ray.get(learner.actors[0].train_step.remote(share))
        expected = ray.get(learner.actors[0].sequence_logprobs.remote(seq))
        assert max(abs(a - b) for a, b in zip(expected, initial)) > 1e-3

        for version, sync in enumerate((CollectiveSync(learner, layout, [1, 2], 60.0),
                                        ObjectStoreSync(learner, layout)), start=1):
            sync.setup(engines)
            assert ray.get(sync.push(engines, version) + sync.side_refs)[:2] == [version, version]
            for engine in engines:
                got = ray.get(engine.sequence_logprobs.remote(seq))
                assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-4, (sync.name, got, expected)
            ray.get(learner.actors[0].train_step.remote(share))  # the next push brings new weights
            expected = ray.get(learner.actors[0].sequence_logprobs.remote(seq))
        ray.get([e.shutdown.remote() for e in engines])
    finally:
        for g in groups:
            g.kill()
        ray.shutdown()
