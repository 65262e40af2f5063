"""The typed config: defaults, YAML + overrides, read-only, and one-line errors naming the key."""
import dataclasses
import os
import subprocess
import sys

import pytest

from rayskd.config import Config, ConfigError, load_config, to_yaml

DEMO = "configs/demo.yaml"


def test_demo_config_loads_with_all_sections(tmp_path, monkeypatch):
    # relative model paths that exist are directories (an `org/name` that exists nowhere is a
    # Hugging Face id): give the demo's a place, whether or not the demo has been prepared
    for role in ("student", "teacher"):
        (tmp_path / "demo_assets" / role).mkdir(parents=True)
    demo = os.path.abspath(DEMO)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(demo)
    assert isinstance(cfg, Config)
    for section in ("run", "data", "reward", "student", "teacher", "rollout", "learner", "algorithm"):
        assert dataclasses.is_dataclass(getattr(cfg, section))
    assert cfg.algorithm.kd.divergence == "reverse_kl" and cfg.algorithm.rehearsal.coef == 0.0
    # relative paths resolved against the working directory
    assert cfg.student.path == str(tmp_path / "demo_assets" / "student")


def test_overrides_and_read_only():
    cfg = load_config(DEMO, ["learner.lr=1e-5", "rollout.num_workers=2", "algorithm.kd.coef=0.5"])
    assert cfg.learner.lr == 1e-5 and cfg.rollout.num_workers == 2 and cfg.algorithm.kd.coef == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.learner.lr = 1.0


@pytest.mark.parametrize("override,key", [
    ("learner.lr=abc", "learner.lr"),
    ("learner.lrr=1", "learner.lrr"),
    ("nosuch.section=1", "nosuch"),
    ("rollout.num_workers=1.5", "rollout.num_workers"),
    ("learner.zero_stage=4", "learner.zero_stage"),
    ("algorithm.kd.divergence=kl", "algorithm.kd.divergence"),
    ("algorithm.kd.divergence=js", "algorithm.kd.estimator"),
    ("algorithm.kd.estimator=topk", "teacher.top_k"),
    ("algorithm.kd.divergence=taid", "algorithm.kd.estimator"),  # TAID needs the teacher's distribution
    ("algorithm.kd.taid.t_start=1.2", "algorithm.kd.taid.t_start"),
    ("algorithm.kd.taid.beta=1", "algorithm.kd.taid.beta"),
    ("algorithm.kd.taid.tstart=0.5", "algorithm.kd.taid.tstart"),
    ("rollout.samples_per_prompt=1", "rollout.samples_per_prompt"),
    ("learner.micro_batch_size=0", "learner.micro_batch_size"),
    ("learner.world_size=3", "algorithm.prompts_per_step"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("rollout.top_p=0.9", "rollout.top_p"),
    ("rollout.top_k=50", "rollout.top_k"),
    ("rollout.max_failures=-1", "rollout.max_failures"),
    ("algorithm.kd.estimator=minillm_topk", "teacher.top_k"),  # its single-step part needs the distribution
    ("algorithm.kd.minillm.gamma=1.5", "algorithm.kd.minillm.gamma"),
    ("algorithm.kd.estimator=sparse", "teacher.sparse_samples"),  # it reads the teacher's draws
    ("algorithm.kd.estimator=full", "teacher.send_hidden"),  # it reads the teacher's hidden states
    ("teacher.sparse_samples=-1", "teacher.sparse_samples"),
    ("teacher.sparse_temperature=0", "teacher.sparse_temperature"),
    ("learner.zero_stage=4", "learner.zero_stage"),
    ("rollout.gpus_per_worker=1.5", "rollout.gpus_per_worker"),
    ("algorithm.rehearsal.coef=0.1", "algorithm.rehearsal.data_path"),
    ("reward.function=nocolon", "reward.function"),
    ("reward.name=bleu", "reward.name"),
    ("run.resume=sometimes", "run.resume"),
    ("algorithm.gkd.lmbda=1.5", "algorithm.gkd.lmbda"),
    ("algorithm.gkd.lmbda=0.5", "algorithm.kd.estimator"),  # k2 on a dataset response estimates nothing
    ("algorithm.gkd.off_policy=replay", "algorithm.gkd.off_policy"),
    ("algorithm.skd.top_k=2", "algorithm.pg_coef"),  # its sequences are not the student's samples
    ("algorithm.skd.block=0", "algorithm.skd.block"),
    ("algorithm.kd.minillm.mix_alpha=1", "algorithm.kd.minillm.mix_alpha"),
    ("run.eval_curve_samples=9", "run.eval_curve_samples"),  # more than run.eval_samples (8)
    ("algorithm.distillm.capacity=8", "algorithm.kd.estimator"),  # it trains on dataset responses
    ("algorithm.distillm.capacity=-1", "algorithm.distillm.capacity"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, [override])
    assert e.value.key == key
    assert "\n" not in str(e.value)


def test_term_gradients_need_whole_gradients():
    """learner.log_term_grads reads each term's whole gradient on a rank: ZeRO-3 partitions it."""
    assert load_config(DEMO, ["learner.log_term_grads=true"]).learner.log_term_grads
    with pytest.raises(ConfigError, match="ZeRO stage 0, 1 or 2") as e:
        load_config(DEMO, ["learner.log_term_grads=true", "learner.zero_stage=3"])
    assert e.value.key == "learner.log_term_grads"


def test_valid_combinations():
    load_config(DEMO, ["algorithm.kd.divergence=js", "algorithm.kd.estimator=topk", "teacher.top_k=8"])
    load_config(DEMO, ["algorithm.kd.divergence=taid", "algorithm.kd.estimator=topk", "teacher.top_k=8",
                       "algorithm.kd.taid.t_start=0.2", "algorithm.kd.taid.alpha=1e-3"])
    # issue 26.7: one sample per prompt where no term needs a group (distillation alone)
    load_config(DEMO, ["rollout.samples_per_prompt=1", "algorithm.pg_coef=0"])
    with pytest.raises(ConfigError, match="pg_coef=0, takes 1"):
        load_config(DEMO, ["rollout.samples_per_prompt=1"])
    load_config(DEMO, ["algorithm.kd.estimator=minillm_topk", "teacher.top_k=8", "algorithm.kd.minillm.gamma=1",
                       "algorithm.kd.minillm.length_norm=false"])
    with pytest.raises(ConfigError, match="sequence-level reverse KL") as e:
        load_config(DEMO, ["algorithm.kd.estimator=minillm_topk", "teacher.top_k=8", "algorithm.kd.divergence=js"])
    assert e.value.key == "algorithm.kd.divergence"
    load_config(DEMO, ["algorithm.kd.estimator=sparse", "teacher.sparse_samples=8", "algorithm.kd.divergence=forward_kl",
                       "teacher.sparse_temperature=1.5"])
    with pytest.raises(ConfigError, match="without bias for that divergence only") as e:  # unbiased for forward KL
        load_config(DEMO, ["algorithm.kd.estimator=sparse", "teacher.sparse_samples=8"])
    assert e.value.key == "algorithm.kd.divergence"
    # the teacher-hacking monitor: a golden model scored on the evaluation's sampled responses
    cfg = load_config(DEMO, ["teacher.golden_path=demo_assets/student"])
    assert cfg.teacher.golden_path == os.path.abspath("demo_assets/student")
    for extra, key in ((["run.eval_samples=0"], "run.eval_samples"), (["data.eval_path=null"], "teacher.golden_path")):
        with pytest.raises(ConfigError, match="golden model is scored on the evaluation") as e:
            load_config(DEMO, ["teacher.golden_path=demo_assets/student", *extra])
        assert e.value.key == key
    with pytest.raises(ConfigError, match="one distribution payload") as e:
        load_config(DEMO, ["algorithm.kd.estimator=topk", "teacher.top_k=8", "teacher.sparse_samples=8"])
    assert e.value.key == "teacher.sparse_samples"
    load_config(DEMO, ["algorithm.kd.estimator=full", "teacher.send_hidden=true", "algorithm.kd.divergence=js"])
    with pytest.raises(ConfigError, match="one distribution payload") as e:
        load_config(DEMO, ["algorithm.kd.estimator=full", "teacher.send_hidden=true", "teacher.top_k=8"])
    assert e.value.key == "teacher.send_hidden"
    load_config(DEMO, ["algorithm.kd.estimator=k1_reward", "algorithm.advantage=dr_grpo",
                       "algorithm.aggregation=seq_mean_token_sum_norm", "rollout.gpus_per_worker=0.25"])


OTHER = "teacher.others=[demo_assets/student]"


@pytest.mark.parametrize("extra,key,why", [
    ([], "teacher.route_field", "picks each prompt's teacher by a data field"),
    (["teacher.combine=vote"], "teacher.combine", "route"),
    (["teacher.route_field=domain", "teacher.names=[a]"], "teacher.names", "one per teacher"),
    (["teacher.route_field=domain", "teacher.names=[a,a]"], "teacher.names", "distinct"),
    (["teacher.route_field=domain", "teacher.coefs=[1,-1]"], "teacher.coefs", ">= 0"),
    (["teacher.combine=ensemble", "teacher.coefs=[0,0]"], "teacher.coefs", "not all be 0"),
    (["teacher.combine=ensemble", "teacher.route_field=domain"], "teacher.route_field", "teacher.combine=route"),
    (["teacher.combine=ensemble", "teacher.top_k=8", "algorithm.kd.estimator=topk"], "teacher.combine", "mixture"),
    (["teacher.route_field=domain", "teacher.send_hidden=true", "algorithm.kd.estimator=full"], "teacher.send_hidden",
     "LM head"),
])
def test_several_teachers_refused_settings_name_the_key(extra, key, why):
    with pytest.raises(ConfigError, match=why) as e:
        load_config(DEMO, [OTHER, *extra])
    assert e.value.key == key


def test_teacher_samples_need_the_teachers_engines_and_two_requests():
    from rayskd.config import gpus_asked, requests_per_step

    gkd = ["algorithm.gkd.lmbda=0.5", "algorithm.gkd.off_policy=teacher", "algorithm.kd.estimator=topk",
           "teacher.top_k=8"]
    with pytest.raises(ConfigError, match="give it engines") as e:
        load_config(DEMO, gkd)
    assert e.value.key == "teacher.generation.num_workers"
    cfg = load_config(DEMO, [*gkd, "teacher.generation.num_workers=2", "teacher.generation.gpus_per_worker=1"])
    assert requests_per_step(cfg) == 2 and gpus_asked(cfg) == 2  # the teacher's prompts are requests of their own
    with pytest.raises(ConfigError, match="at least 2 requests") as e:
        load_config(DEMO, [*gkd, "teacher.generation.num_workers=1", "rollout.prompts_per_request=32"])
    assert e.value.key == "rollout.prompts_per_request"


def test_mixed_sampling_needs_the_learners_weights_to_be_the_samplers():
    load_config(DEMO, ["algorithm.kd.minillm.mix_alpha=0.2", "algorithm.kd.estimator=minillm"])
    with pytest.raises(ConfigError, match="needs 0") as e:
        load_config(DEMO, ["algorithm.kd.minillm.mix_alpha=0.2", "algorithm.max_staleness=1"])
    assert e.value.key == "algorithm.max_staleness"


def test_several_teachers_resolve():
    from rayskd.config import gpus_asked, teacher_coefs, teacher_names

    cfg = load_config(DEMO, [OTHER, "teacher.route_field=domain", "teacher.names=[plain,carry]",
                             "teacher.coefs=[1,0.5]", "teacher.gpus_per_worker=1", "teacher.num_workers=2"])
    assert cfg.teacher.others == [os.path.abspath("demo_assets/student")]
    assert teacher_names(cfg) == ["plain", "carry"] and teacher_coefs(cfg) == [1, 0.5]
    assert gpus_asked(cfg) == 4  # two pools of two workers
    cfg = load_config(DEMO, [OTHER, "teacher.combine=ensemble", "teacher.coefs=[3,1]"])
    assert teacher_names(cfg) == ["0", "1"] and teacher_coefs(cfg) == [0.75, 0.25]  # mixture weights
    with pytest.raises(ConfigError, match="list the others") as e:  # one teacher has nothing to route to
        load_config(DEMO, ["teacher.route_field=domain"])
    assert e.value.key == "teacher.route_field"


def test_missing_mandatory_value():
    with pytest.raises(ConfigError) as e:
        load_config(None, [])
    assert e.value.key in ("data.train_path", "student.path", "teacher.path")


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(DEMO, ["learner.lr=0.25"])
    p = tmp_path / "resolved.yaml"
    p.write_text(to_yaml(cfg))
    assert load_config(str(p)) == cfg


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "rayskd", *args], capture_output=True, text=True)


def test_cli_print_config_and_exit_status_2():
    ok = run_cli("print-config", DEMO)
    assert ok.returncode == 0 and "algorithm:" in ok.stdout and "kd:" in ok.stdout and "learner:" in ok.stdout
    bad = run_cli("print-config", DEMO, "learner.lr=abc")
    assert bad.returncode == 2
    assert "learner.lr" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    missing = run_cli("print-config", "does/not/exist.yaml")
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_yaml_error_keeps_line_and_column_and_an_unreachable_cluster_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  steps: 3\n  seed: [1\n")
    r = run_cli("print-config", str(bad))
    assert r.returncode == 2 and "line 4, column 1" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    for command in (["status", "raysubmit_x"], ["logs", "raysubmit_x"], ["stop", "raysubmit_x"],
                    ["submit", DEMO]):
        r = run_cli(*command, "--address", "http://127.0.0.1:9")
        assert r.returncode == 2 and "cannot reach the Ray cluster" in r.stderr, (command, r.stderr[-2000:])
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("override,why", [
    ("rollout.top_p=0.9", "whole vocabulary"),
    ("rollout.top_k=20", "whole vocabulary"),
    ("learner.zero_stage=4", "must be 0, 1, 2 or 3"),
    # GPUs that nothing would use (issue 15.3): a worker uses as many as its tensor-parallel ranks
    ("rollout.gpus_per_worker=2", "tensor_parallel_size=2 to use them"),
    ("teacher.gpus_per_worker=4", "tensor_parallel_size=4 to use them"),
    # layouts no cluster can hold (issue 25.2): two learner ranks on one GPU (NCCL refuses), an
    # engine taking more of a GPU's memory than its share of the GPU
    ("learner.gpus_per_worker=0.5", "NCCL refuses"),
    ("rollout.gpu_memory_utilization=0.8", "more than the engine's share"),
])
def test_unsupported_settings_exit_2_saying_why(override, why):
    """Issue 8.4 / 8.9: settings the learner cannot honour are refused before anything
    starts, with the reason, instead of training something else."""
    extra = {"learner.gpus_per_worker=0.5": ["learner.world_size=2"],
             "rollout.gpu_memory_utilization=0.8": ["rollout.gpus_per_worker=0.5"]}.get(override, [])
    r = run_cli("print-config", DEMO, override, *extra)
    assert r.returncode == 2 and why in r.stderr and override.split("=")[0] in r.stderr


def test_teacher_temperature_different_from_sampling_is_reported():
    """Issue 8.8: a teacher temperature other than the sampling one moves the fixed point."""
    from rayskd.config import notices

    assert notices(load_config(DEMO)) == []
    cfg = load_config(DEMO, ["teacher.temperature=2.0"])
    (line,) = notices(cfg)
    assert "0.5 x the teacher's" in line
    r = run_cli("print-config", DEMO, "teacher.temperature=2.0")
    assert r.returncode == 0 and "teacher.temperature=2.0" in r.stderr


def test_the_gpu_cluster_example_resolves():
    """configs/gsm8k_kdrl_gpu.yaml (issue 13.7): `rayskd print-config` accepts it as written."""
    r = subprocess.run([sys.executable, "-m", "rayskd", "print-config", "configs/gsm8k_kdrl_gpu.yaml"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg = load_config("configs/gsm8k_kdrl_gpu.yaml")
    assert cfg.reward.name == "math" and cfg.data.chat_template and cfg.learner.world_size == 4
    assert cfg.rollout.gpus_per_worker == cfg.teacher.gpus_per_worker == cfg.learner.gpus_per_worker == 1


def test_more_gpus_than_the_machine_has_exit_2_before_ray_starts(demo_assets, tmp_path):
    """Issue 25.2: the GPUs a run asks for are counted against this machine's (a local cluster)
    before any actor starts (this machine has none: one GPU is too many)."""
    r = run_cli("train", DEMO, "rollout.gpus_per_worker=1", f"run.output_dir={tmp_path / 'run'}")
    assert r.returncode == 2 and "asks for 1 GPUs (rollout 1 x 1)" in r.stderr and "this machine has 0" in r.stderr, \
        r.stderr[-2000:]
    assert "Started a local Ray instance" not in r.stdout + r.stderr
