"""GRPO losses (halluc/objectives/grpo.py): golden advantages, and the loss and its gradient against TRL
1.16's GRPOTrainer._compute_loss on identical log-probs, advantages and masks (TRL as a test-only oracle)."""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from halluc.objectives.grpo import group_advantages, policy_loss


def test_group_advantages_golden():
    rewards = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    a = group_advantages(rewards, 4)
    std = math.sqrt(4 / 3)  # Bessel's correction, as TRL's nanstd
    assert a[:4].tolist() == pytest.approx([1 / (std + 1e-4), -1 / (std + 1e-4), -1 / (std + 1e-4), 1 / (std + 1e-4)])
    assert a[4:].tolist() == [0.0] * 4  # a group that agrees teaches nothing
    assert group_advantages(rewards, 4, "none").tolist() == [1, -1, -1, 1, 0, 0, 0, 0]
    batch_std = rewards.std().item()
    assert group_advantages(rewards, 4, "batch")[0].item() == pytest.approx(1 / (batch_std + 1e-4))
    with pytest.raises(ValueError, match="not groups of 3"):
        group_advantages(rewards, 3)


def test_the_clip_only_stops_the_gradient_on_the_side_the_advantage_pushes():
    """PPO's clip: a ratio above 1 + eps with a positive advantage gets no gradient; below it, it does."""
    old = torch.zeros(1, 2)
    logps = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    loss, metrics = policy_loss(logps, old, torch.tensor([1.0]), torch.ones(1, 2))
    loss.backward()
    assert logps.grad[0, 0] == 0 and logps.grad[0, 1] < 0
    assert metrics["clip_ratio/high_mean"] == 0.5 and metrics["clip_ratio/low_mean"] == 0.0


def _trl_loss(logps, old, ref, adv, mask, loss_type, beta, eps_low, eps_high, max_len):
    """TRL's GRPOTrainer._compute_loss, unbound, on a stand-in trainer that returns these log-probs."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

    accelerator = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x, num_processes=1,
                                  reduce=lambda x, reduction="sum": x, sync_gradients=True)
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1), use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=max_len,
        accelerator=accelerator, _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)})
    b, t = logps.shape
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return trl_grpo.GRPOTrainer._compute_loss(stub, None, inputs), stub._metrics["train"]


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_equal_trls(loss_type, beta):
    torch.manual_seed(0)
    b, t = 6, 9
    mask = (torch.arange(t) < torch.randint(2, t + 1, (b, 1))).float()  # completions of different lengths
    old = -torch.rand(b, t) * 3
    ref = -torch.rand(b, t) * 3
    base = old + torch.randn(b, t) * 0.3  # the policy moved: some ratios leave the clip range
    adv = group_advantages(torch.randn(b), 3)
    ours = base.clone().requires_grad_(True)
    loss, metrics = policy_loss(ours, old, adv, mask, ref_logps=ref, beta=beta, eps_low=0.2, eps_high=0.28,
                                loss_type=loss_type, max_completion_length=t)
    loss.backward()
    theirs = base.clone().requires_grad_(True)
    trl_loss, trl_metrics = _trl_loss(theirs, old, ref, adv, mask, loss_type, beta, 0.2, 0.28, t)
    trl_loss.backward()
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-6, abs=1e-7)
    assert torch.allclose(ours.grad, theirs.grad, rtol=1e-5, atol=1e-7)
    assert metrics["clip_ratio/region_mean"] == pytest.approx(trl_metrics["clip_ratio/region_mean"][0], abs=1e-6)
    assert metrics["clip_ratio/region_mean"] > 0  # the case exercises the clip
    if beta:
        assert metrics["kl"] == pytest.approx(trl_metrics["kl"][0], rel=1e-5)
    # negative control: another normalisation is another loss
    other = {"grpo": "dapo", "dapo": "dr_grpo", "dr_grpo": "grpo"}[loss_type]
    wrong, _ = policy_loss(base, old, adv, mask, ref_logps=ref, beta=beta, eps_low=0.2, eps_high=0.28,
                           loss_type=other, max_completion_length=t)
    assert abs(wrong.item() - trl_loss.item()) > 1e-4


@pytest.fixture(scope="module")
def sampled():
    """A tiny Llama (sdpa) and traces it sampled under each semantics, BTs forced at rate 0.3, with the
    generator's recorded log-probs."""
    import random

    from test_generate import BT, EOS, tiny_model

    from halluc.inference.generate import Forcing, Sampling, generate

    model = tiny_model()
    rng = random.Random(0)
    prompts = [[rng.randrange(2, BT) for _ in range(rng.randint(1, 8))] for _ in range(6)]
    out = {}
    for semantics in ("keep", "rewind"):
        gens = generate(model, prompts, max_new_tokens=40, backtrack_id=BT, eos_token_id=EOS, semantics=semantics,
                        sampling=Sampling(1.0, 1.0, 3), forcing=Forcing(backtrack_rate=0.3, seed=1), record_logprobs=True,
                        record_logits=True)
        out[semantics] = gens
    return model, prompts, out


@pytest.mark.parametrize("semantics", ["keep", "rewind"])
@pytest.mark.parametrize("backend", ["dense", "dense_units", "varlen", "varlen_kv"])
def test_the_trainers_log_probs_of_sampled_traces_equal_the_generators(sampled, semantics, backend):
    """GRPO's ratio needs the trainer to score a trace exactly as the generator sampled it: keep traces in
    the causal layout, rewind traces with erased tokens blocked and rewound positions, on every CPU backend.
    Negative control: a rewind trace scored in the keep layout (or the reverse) differs."""
    import copy

    from test_generate import BT

    from halluc.objectives.grpo import trace_example, trace_log_probs
    from halluc.structure.backends import use_backend

    model, prompts, gens = sampled
    scorer = copy.deepcopy(model)
    use_backend(scorer, backend)
    examples = [trace_example(p, g.trace, BT) for p, g in zip(prompts, gens[semantics])]
    assert sum(g.n_backtracks for g in gens[semantics]) > 10
    with torch.no_grad():
        got = trace_log_probs(scorer, examples, semantics, backend)
        other = trace_log_probs(scorer, examples, {"keep": "rewind", "rewind": "keep"}[semantics], backend)
    worst, control = 0.0, 0.0
    for g, ours, theirs in zip(gens[semantics], got, other):
        want = torch.tensor(g.logprobs)
        assert len(ours) == len(g.trace) == len(want)
        worst = max(worst, (ours - want).abs().max().item())
        control = max(control, (theirs - want).abs().max().item())
    assert worst < 1e-4, worst
    assert control > 1e-2, control


@pytest.mark.parametrize("semantics", ["keep", "rewind"])
def test_log_probs_are_scored_at_the_sampling_temperature(sampled, semantics):
    """Tokens sampled at temperature T are scored under softmax(logits / T), the distribution they were
    drawn from (as TRL does); at T = 1 that is the generator's record (negative control: T = 1 differs)."""
    import copy

    from test_generate import BT

    from halluc.objectives.grpo import trace_example, trace_log_probs
    from halluc.structure.backends import use_backend

    model, prompts, gens = sampled
    scorer = copy.deepcopy(model)
    use_backend(scorer, "dense")
    examples = [trace_example(p, g.trace, BT) for p, g in zip(prompts, gens[semantics])]
    with torch.no_grad():
        hot = trace_log_probs(scorer, examples, semantics, "dense", temperature=2.0)
        plain = trace_log_probs(scorer, examples, semantics, "dense")
    for g, ours, one in zip(gens[semantics], hot, plain):
        want = torch.stack([torch.log_softmax(lg.float() / 2.0, -1)[t] for lg, t in zip(g.logits, g.trace)])
        assert (ours - want).abs().max() < 1e-4
        assert (one - want).abs().max() > 1e-2


def test_the_bt_aware_reward_golden():
    from halluc.sources.rollouts import RewardSettings, completion_reward

    both, answer_only = RewardSettings(bt_term=True, kappa=0.1), RewardSettings(bt_term=False)
    assert completion_reward(True, 2, 40, both) == 2.0    # right within the budget (2 <= 4)
    assert completion_reward(True, 5, 40, both) == 1.5    # right, over the budget
    assert completion_reward(False, 0, 40, both) == -2.0  # wrong
    assert [completion_reward(r, 9, 40, answer_only) for r in (True, False)] == [1.0, -1.0]
    # the process term: step_weight x the fraction of checked steps that verify (unchecked ones left out)
    from halluc.sources.rollouts import steps_right

    process = RewardSettings(bt_term=False, step_weight=0.5)
    assert steps_right(["ok", "retrieval", "unchecked", "ok"]) == pytest.approx(2 / 3)
    assert steps_right(["unchecked"]) is None and completion_reward(False, 0, 9, process, None) == -1.0
    assert completion_reward(False, 0, 9, process, steps_right(["ok", "ok", "missing"])) == pytest.approx(-1 + 0.5 * 2 / 3)


def test_the_recipe_trains_on_the_lab_policy_and_logs_trls_metric_names(lab_policy, tmp_path):
    """recipes/grpo.py end to end from a policy right about half the time: groups are sampled, rewarded and
    trained on; train.json logs TRL's names and the BT rate; the checkpoint records the recipe and the
    semantics it trained with; the evaluation runs on both test splits."""
    import json

    from conftest import load_script

    folder, _, _, _ = lab_policy
    report = load_script("recipes/grpo.py").main([
        f"model={folder}", f"output_dir={tmp_path}/out", f"cache_dir={tmp_path}/cache", "lab.train_size=2000",
        "lab.sft_size=200", "lab.test_size=8", "eval_max_new_tokens=24", "steps=3", "batch_size=2",
        "rollout.group=4", "rollout.max_new_tokens=48", "lr=1e-4"])
    logged = [h for h in json.loads((tmp_path / "out" / "train.json").read_text()) if "loss" in h]
    assert len(logged) == 3
    for key in ("reward", "reward_std", "kl", "clip_ratio/region_mean", "completions/mean_length", "accuracy",
                "bt_per_completion", "wasted_per_completion"):
        assert key in logged[-1], key
    assert any(h["grad_norm"] > 0 for h in logged)  # some group disagreed: a gradient flowed
    assert logged[-1]["kl"] > 0  # the policy moved away from the reference
    config = json.loads((tmp_path / "out" / "checkpoint" / "config.json").read_text())
    assert config["halluc"]["recipe"] == "grpo" and report["semantics"] in ("keep", "rewind")
    assert set(report["after"]) == {"test_id", "test_ood"}


def test_kill_9_mid_grpo_then_resume_continues_as_an_unbroken_run(lab_policy, tmp_path):
    """Sampling is seeded by the global step, so a run killed with -9 after step 3 and resumed from
    checkpoint-2 samples and trains steps 3-4 exactly as the unbroken run does (losses and rewards equal)."""
    import json
    import os
    import sys

    from conftest import kill_when_paused, load_script, run_processes

    folder, _, _, _ = lab_policy
    out = tmp_path / "out"
    args = [f"model={folder}", "lab.train_size=2000", "lab.sft_size=200", "lab.test_size=2", "eval_max_new_tokens=8",
            "steps=4", "batch_size=2", "rollout.group=3", "rollout.max_new_tokens=24", "save_steps=2",
            f"cache_dir={tmp_path}/cache", f"output_dir={out}", "lr=1e-3"]
    kill_when_paused(args, out, 3, tmp_path / "killed.log", recipe="recipes/grpo.py")
    resumed = run_processes([sys.executable, "recipes/grpo.py", *args, "resume=true"], timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert f"resuming from {out / 'checkpoint-2'}" in resumed.stdout + resumed.stderr
    whole = tmp_path / "whole"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses' float sums
    try:
        load_script("recipes/grpo.py").main([*args[:-2], f"output_dir={whole}", "lr=1e-3"])
    finally:
        torch.set_num_threads(threads)
    history = lambda d: [v for h in json.loads((d / "train.json").read_text()) if "loss" in h  # noqa: E731
                         for v in (h["loss"], h["reward"])]
    assert history(out)[-4:] == pytest.approx(history(whole)[-4:], abs=1e-5)  # steps 3-4: loss and reward


def test_iterations_reuse_one_generation_batch_with_its_old_log_probs(bt_tokenizer, arith_problems):
    """rollout.iterations=2: the first call samples and computes the old log-probs once (equal to the
    policy's own, so the first ratio is exactly 1), the second trains on the same samples, the third
    samples anew."""
    import copy

    from halluc.core.model import tiny_llama
    from halluc.sources.rollouts import GroupSampling, GRPOObjective, RewardSettings
    from halluc.structure.backends import TargetModel, use_backend
    from halluc.tasks import arith

    tok = copy.deepcopy(bt_tokenizer)
    torch.manual_seed(0)
    model = tiny_llama(len(tok), hidden=32, layers=1, heads=2, eos_token_id=tok.eos_token_id)
    use_backend(model, "dense")
    problems = arith_problems[:4]
    prompts = [tok(p.prompt)["input_ids"] for p in problems]
    objective = GRPOObjective(problems, arith, tok, prompts, sampling=GroupSampling(group=3, iterations=2,
                              max_new_tokens=12), rewards=RewardSettings(), semantics="keep")
    target = TargetModel(model, "dense")
    batch = {"problem": torch.tensor([0, 1])}
    loss1, m1 = objective(target, batch)
    first = objective._samples
    assert first.old is not None and len(first.examples) == 6
    assert m1["clip_ratio/region_mean"] == 0.0  # old == new before any update: ratio 1
    loss2, _ = objective(target, {"problem": torch.tensor([2, 3])})  # its problems are not sampled
    assert objective._samples is first and loss2.item() == pytest.approx(loss1.item(), abs=1e-6)
    objective(target, {"problem": torch.tensor([2, 3])})
    assert objective._samples is not first


def test_lora_grpo_uses_the_adapter_off_as_reference_and_saves_an_adapter(lab_policy, tmp_path, monkeypatch):
    """The reference is the policy with its adapter off: KL 0 at the first step (the adapter starts at
    0), above 0 once the adapter trained. Negative control: an adapter left on in the reference keeps
    the KL at 0 (with 24 new tokens every completion was cut, wrong, and nothing trained: it passed)."""
    import contextlib
    import json

    import peft
    from conftest import load_script

    folder, _, _, _ = lab_policy

    def run(out):
        report = load_script("recipes/grpo.py").main([
            f"model={folder}", f"output_dir={out}", f"cache_dir={tmp_path}/cache", "lab.train_size=2000",
            "lab.sft_size=200", "lab.test_size=4", "eval_max_new_tokens=16", "steps=3", "batch_size=2",
            "rollout.group=4", "rollout.max_new_tokens=64", "lr=1e-2", "lora.enabled=true"])
        return report, [h for h in json.loads((out / "train.json").read_text()) if "loss" in h]

    report, logged = run(tmp_path / "out")
    assert len(logged) == 3 and logged[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # adapter at 0: policy == reference
    assert any(h["grad_norm"] > 0 for h in logged[:-1]) and logged[-1]["kl"] > 1e-3
    assert (tmp_path / "out" / "adapter" / "halluc_adapter.json").exists() and report["saved"].endswith("adapter")
    monkeypatch.setattr(peft.PeftModel, "disable_adapter", lambda self: contextlib.nullcontext())
    _, on = run(tmp_path / "adapter_on")
    assert all(h["kl"] == pytest.approx(0.0, abs=1e-6) for h in on)


def test_grpo_runs_on_gsm8k_files(tmp_path, gsm8k_test_file, caplog):
    """A tiny GSM8K model with a BT token: groups sampled from GSM8K problems, rewarded by their final
    answer (the task's verifier needs no annotation for that), evaluated on the test file."""
    import json

    from conftest import load_script
    from test_self_correct import tiny_gsm8k_base

    from halluc.core.model import load_causal_lm
    from halluc.core.tokens import add_backtrack_token
    from halluc.tasks import gsm8k

    tok = tiny_gsm8k_base(tmp_path / "base", gsm8k_test_file)
    model = load_causal_lm(str(tmp_path / "base"))
    add_backtrack_token(tok, model)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    # GSM8K prompts are long: with a position table of 128, the problems that cannot take 16 more tokens are
    # left out of sampling (a learned position table would be indexed past its end), the rest train
    model.config.max_position_embeddings = 128
    model.save_pretrained(tmp_path / "base")
    long = sum(len(tok(p.prompt)["input_ids"]) + 16 > 128 for p in gsm8k.read_jsonl(gsm8k_test_file, limit=20))
    report = load_script("recipes/grpo.py").main([
        f"model={tmp_path / 'base'}", "lab.task=gsm8k", f"lab.train_file={gsm8k_test_file}",
        f"lab.test_file={gsm8k_test_file.parent / 'train.jsonl'}", "lab.test_size=2", "lab.sft_size=20",
        "lab.train_size=20", "max_len=512", "steps=2", "batch_size=2", "rollout.group=2",
        "rollout.max_new_tokens=16", "eval_max_new_tokens=8", f"output_dir={tmp_path}/out"])
    logged = [h for h in json.loads((tmp_path / "out" / "train.json").read_text()) if "loss" in h]
    assert len(logged) == 2 and all(-2 <= h["reward"] <= 2 and "completions/mean_length" in h for h in logged)
    assert report["after"]["test_id"]["n"] == 2
    assert 0 < long < 20  # the case has prompts on both sides of the limit (else it checks nothing)
    assert "not sampled" in caplog.text  # the SFT problems too long for the positions were left out
    with pytest.raises(SystemExit, match="no SFT problem fits"):
        load_script("recipes/grpo.py").main([
            f"model={tmp_path / 'base'}", "lab.task=gsm8k", f"lab.train_file={gsm8k_test_file}",
            f"lab.test_file={gsm8k_test_file.parent / 'train.jsonl'}", "lab.test_size=2", "lab.sft_size=20",
            "lab.train_size=20", "max_len=512", "steps=1", "rollout.max_new_tokens=128", f"output_dir={tmp_path}/no"])


@pytest.mark.slow
def test_zero3_with_two_processes_samples_trains_and_saves(lab_policy, tmp_path):
    """`deepspeed --num_gpus 2 recipes/grpo.py deepspeed=ds_configs/zero3.json` (CPU, gloo): each process
    gathers the policy's shards once (hooks off) to generate its own prompts' groups, the reference is a ZeRO-3 inference
    engine, and the run logs its steps and saves a whole checkpoint. (Not equal to one process: each
    process samples its own prompts with its own batch, so the draws differ.)"""
    import json
    import os

    from conftest import deepspeed_launcher, run_processes, shared_memory_left

    folder, _, _, _ = lab_policy
    launcher = deepspeed_launcher()
    run = run_processes([*launcher, "recipes/grpo.py", f"model={folder}", "lab.train_size=2000", "lab.sft_size=200",
                         "lab.test_size=2", "eval_max_new_tokens=8", "steps=2", "batch_size=2", "rollout.group=2",
                         # long enough that the two processes' rows end at different steps: generation may run
                         # no collective per token (a per-layer gather would hang there)
                         "rollout.max_new_tokens=96", "deepspeed=ds_configs/zero3.json", f"cache_dir={tmp_path}/cache",
                         f"output_dir={tmp_path}/out"], timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    assert "reference model under DeepSpeed (ZeRO stage 3)" in run.stdout + run.stderr
    logged = [h for h in json.loads((tmp_path / "out" / "train.json").read_text()) if "loss" in h]
    assert len(logged) == 2 and all("reward" in h for h in logged)
    assert (tmp_path / "out" / "checkpoint" / "model.safetensors").exists()
    assert shared_memory_left(launcher) == []


def test_a_learned_process_reward_is_the_mean_step_score_of_the_verifier(bt_tokenizer, arith_problems):
    """reward.process=prm|head: R_step = step_weight x the mean P(right) the verifier gives the visible text at
    each step's end. With the oracle standing in for the learned verifier the golden values are known: a
    right solution scores 1, one whose second of three steps is wrong 1/3 (right, then wrong from there on),
    a text with no step None."""
    from halluc.inference.verifiers import OracleVerifier
    from halluc.objectives.verifier_head import step_end_ids
    from halluc.sources.rollouts import learned_steps_right
    from halluc.tasks import arith

    tok, problem = bt_tokenizer, arith_problems[0]
    steps = arith.split_steps(problem.solution)
    assert len(steps) == 3 and arith.verify_steps(problem, steps).kinds == ["ok"] * 3
    head, value = steps[1].rstrip(" ;").rsplit(" ", 1)
    wrong = f"{head} {int(value) + 1} ;"
    texts = [problem.solution, "".join([steps[0], wrong, steps[2]]), ""]
    visible = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    prompt = tok(problem.prompt)["input_ids"]
    scores = learned_steps_right(OracleVerifier(arith, [problem], tok), [prompt] * 3, visible,
                                 frozenset(step_end_ids(tok, arith.STEP_SEPARATOR)))
    assert scores == [1.0, pytest.approx(1 / 3), None]


def test_the_process_reward_settings_are_refused_when_they_cannot_apply():
    from halluc.sources.rollouts import RewardSettings

    for bad, message in ((RewardSettings(step_weight=0.5, process="prm"), "needs reward.process_model"),
                         (RewardSettings(step_weight=0.5, process_model="x"), "not oracle"),
                         (RewardSettings(process="head", process_model="x"), "would weigh 0")):
        with pytest.raises(ValueError, match=message):
            bad.check()
    RewardSettings(step_weight=0.5, process="head", process_model="x").check()


def test_grpo_with_a_learned_process_reward_from_a_verifier_head(lab_policy, tmp_path):
    """End to end: the lab policy's own head (frozen, loaded from its folder) scores each completion's steps;
    the logged process score is a mean probability, strictly inside (0, 1) for a head that is not certain,
    and the reward moves by step_weight x that score (the answer-only reward is +-1)."""
    import json

    from conftest import load_script

    folder, _, _, _ = lab_policy
    common = [f"model={folder}", f"cache_dir={tmp_path}/cache", "lab.train_size=2000", "lab.sft_size=200",
              "lab.test_size=4", "eval_max_new_tokens=8", "steps=2", "batch_size=2", "rollout.group=4",
              "rollout.max_new_tokens=40", "reward.bt_term=false", "beta=0"]
    load_script("recipes/grpo.py").main([*common, f"output_dir={tmp_path}/head", "reward.step_weight=0.5",
                                         "reward.process=head", f"reward.process_model={folder}"])
    logged = [h for h in json.loads((tmp_path / "head" / "train.json").read_text()) if "loss" in h]
    assert len(logged) == 2
    for h in logged:
        assert 0 < h["process_score"] < 1
        # every completion's reward is +-1 + 0.5 x its score: the batch mean is 2 x accuracy - 1 + 0.5 x the mean score
        assert h["reward"] == pytest.approx(2 * h["accuracy"] - 1 + 0.5 * h["process_score"], abs=1e-5)


def test_a_prm_process_verifier_loads_frozen_and_scores_the_policys_ids(lab_policy, tmp_path):
    """reward.process=prm: the PRM folder loads frozen (a fresh-head PRM started from the policy stands in for
    a trained one), its scores are probabilities per completion; a PRM with another tokenizer is refused."""
    from halluc.objectives.prm import load_prm
    from halluc.objectives.verifier_head import step_end_ids
    from halluc.sources.rollouts import RewardSettings, learned_steps_right, load_process_verifier
    from halluc.tasks import arith

    folder, _, tokenizer, problems = lab_policy
    load_prm(str(folder), new_head=True).save_pretrained(tmp_path / "prm")
    tokenizer.save_pretrained(tmp_path / "prm")
    verifier = load_process_verifier(RewardSettings(step_weight=1.0, process="prm",
                                                    process_model=str(tmp_path / "prm")), tokenizer)
    assert not any(p.requires_grad for p in verifier.prm.parameters())
    prompts = [tokenizer(p.prompt)["input_ids"] for p in problems[:2]]
    visible = [tokenizer(p.solution, add_special_tokens=False)["input_ids"] for p in problems[:2]]
    scores = learned_steps_right(verifier, prompts, visible, frozenset(step_end_ids(tokenizer, arith.STEP_SEPARATOR)))
    assert all(0 < s < 1 for s in scores)
    from halluc.core.tokens import train_tokenizer

    train_tokenizer(["a b c ; d = 1"]).save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit, match="another tokenizer"):
        load_process_verifier(RewardSettings(step_weight=1.0, process="prm", process_model=str(tmp_path / "other")),
                              tokenizer)


def test_grpo_from_the_lab_base_starts_from_the_base_with_a_bt_token_and_no_sft(lab_policy, tmp_path):
    """start=base: the policy is the lab base with a BT token added (semantic init) and no SFT: every weight
    the base had is unchanged (the lab SFT model's are not: the negative control), the BT row is new, the
    start is cached beside the base, and GRPO trains from it. start=base with model= is refused."""
    import json
    from pathlib import Path

    from conftest import POLICY_LAB, load_script
    from halluc.core.model import load_causal_lm
    from halluc.core.tokens import backtrack_id, load_tokenizer

    folder, _, _, _ = lab_policy
    cache = Path(folder).parents[1] / "cache"  # the lab policy's own: its base is trained already
    grpo = load_script("recipes/grpo.py")
    report = grpo.main([f"cache_dir={cache}", *POLICY_LAB, f"output_dir={tmp_path}/out", "start=base", "steps=2",
                        "batch_size=2", "rollout.group=3", "rollout.max_new_tokens=24", "eval_max_new_tokens=8",
                        "lab.test_size=4", "lr=1e-3"])
    start = Path(report["start"])
    assert start.parent.name.startswith("base_bt-") and start.parent.parent == cache
    base_dir = next(p for p in cache.glob("base-*") if p.is_dir() and (p / "config.json").exists())
    base, policy, sft = load_causal_lm(str(base_dir)), load_causal_lm(str(start)), load_causal_lm(str(folder))
    bt = backtrack_id(load_tokenizer(start))
    assert bt == base.config.vocab_size  # a new row, after the base's vocabulary
    for name, weight in base.state_dict().items():
        ours = policy.state_dict()[name]
        if ours.shape != weight.shape:  # the embedding and head grew by the BT row
            ours = ours[: weight.shape[0]]
        assert torch.equal(ours, weight), name
    assert not torch.equal(sft.state_dict()["model.layers.0.mlp.up_proj.weight"], base.state_dict()["model.layers.0.mlp.up_proj.weight"])
    logged = [h for h in json.loads((tmp_path / "out" / "train.json").read_text()) if "loss" in h]
    assert len(logged) == 2 and set(report["after"]) == {"test_id", "test_ood"}
    with pytest.raises(ValueError, match="start=base"):
        grpo.Config(model=str(folder), start="base").check()
