"""Backtracking generation: oracle equivalence with training forwards, batching, HF parity,
loop guards, semantics from the checkpoint, and the evaluation harness on arith and GSM8K."""
import copy
import json
import logging
import random

import pytest
import torch
from conftest import load_script
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from halluc.structure.attention import dense_mask, edit_tree, position_ids
from halluc.inference.evaluate import evaluate_problems, markdown_table, score_problem
from halluc.core.example import Role, apply_backtrack
from halluc.inference.generate import Forcing, Generation, LoopGuards, Sampling, generate, semantics_for
from halluc.inference.judge import backtrack_runs
from halluc.tasks import arith, get_task, gsm8k

VOCAB, BT, EOS, PAD = 48, 47, 1, 0
REQUIRED_KEYS = {"n", "answer_acc", "full_solution_acc", "step_validity", "bt_per_problem", "erased_per_problem",
                 "first_error_kinds", "samples", "per_problem"}


def tiny_model(vocab: int = VOCAB, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def random_trace(rng: random.Random, n: int) -> list[int]:
    """Segments of 1-6 normal tokens and BT runs of 1-7: runs often delete more than the
    tokens just written, and sometimes everything (BTs with nothing left to delete)."""
    trace: list[int] = []
    while len(trace) < n:
        trace += [rng.randrange(2, BT) for _ in range(rng.randint(1, 6))]
        trace += [BT] * rng.choice([1, 1, 2, 3, 4, 7])
    return trace[:n] + [rng.randrange(2, BT)]  # end on a normal token


def training_logits(model, prompt, trace, mode: str, scheme: str) -> torch.Tensor:
    """One training-style forward over prompt + trace: the logits that predict each trace token."""
    roles = [Role.PROMPT] * len(prompt) + [Role.BACKTRACK if t == BT else Role.KEPT for t in trace]
    end, depth = edit_tree(roles, mode)
    pos = torch.as_tensor(position_ids(depth=depth, scheme=scheme), dtype=torch.long)[None]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + trace]), attention_mask=dense_mask(end)[None, None],
                       position_ids=pos).logits[0]
    return logits[len(prompt) - 1: len(prompt) - 1 + len(trace)]


def forced_batch(seed: int, n: int = 6):
    rng = random.Random(seed)
    prompts = [[rng.randrange(2, BT) for _ in range(rng.randint(2, 9))] for _ in range(n)]
    traces = [random_trace(rng, rng.randint(20, 50)) for _ in range(n)]
    return prompts, traces


def correction_steps(trace: list[int]) -> list[int]:
    """Indices of trace tokens predicted from a token written right after a BT run."""
    return [i + 1 for i in range(1, len(trace) - 1) if trace[i] != BT and trace[i - 1] == BT]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rewind_matches_block_errors_forward_and_differs_from_causal(model, seed):
    prompts, traces = forced_batch(seed)
    gens = generate(model, prompts, max_new_tokens=80, backtrack_id=BT, eos_token_id=None, semantics="rewind",
                    forcing=Forcing(traces), record_logits=True)
    for prompt, trace, gen in zip(prompts, traces, gens):
        assert gen.trace == trace and gen.visible == apply_backtrack(trace, BT)
        got = torch.stack(gen.logits)
        want = training_logits(model, prompt, trace, "block_errors", "rewound")
        assert (got - want).abs().max() < 1e-4
        causal = training_logits(model, prompt, trace, "causal", "original")
        at = correction_steps(trace)
        assert at and (got[at] - causal[at]).abs().amax(-1).min() > 1e-2  # negative control, every such step
    # the traces have runs that delete more than the segment written since the previous run,
    # and runs with more BTs than visible tokens (BTs that erase nothing)
    deeper = past_floor = 0
    for trace in traces:
        previous_end = 0
        for run in backtrack_runs(trace, BT):
            deeper += len(run.before) - len(run.after) > run.start - previous_end
            past_floor += run.length > len(run.before)
            previous_end = run.start + run.length
    assert deeper >= 2 and past_floor >= 1


def test_keep_matches_causal_forward(model):
    prompts, traces = forced_batch(7)
    gens = generate(model, prompts, max_new_tokens=80, backtrack_id=BT, eos_token_id=None, semantics="keep",
                    forcing=Forcing(traces), record_logits=True)
    for prompt, trace, gen in zip(prompts, traces, gens):
        want = training_logits(model, prompt, trace, "causal", "original")
        assert (torch.stack(gen.logits) - want).abs().max() < 1e-4
        assert gen.token_forwards == len(prompt) + len(trace) - 1  # the last forced token is never fed


def bt_rule_hook(model, ends: bool = False):
    """Make BT the argmax after inputs that are multiples of 4, and continue a run at
    positions not divisible by 3: a deterministic mix of BT runs of different lengths. `ends`:
    EOS after an input 2 mod 11 past position 12 too, so rows end at different steps."""
    def hook(module, args, kwargs, out):
        ids, pos = kwargs["input_ids"][:, -1], kwargs["position_ids"][:, -1]
        wants_bt = (ids % 4 == 0) | ((ids == BT) & (pos % 3 != 0))
        out.logits[:, -1, BT] += 10.0 * wants_bt
        if ends:
            out.logits[:, -1, EOS] += 20.0 * ((ids % 11 == 2) & (pos > 12))
        return out
    return model.register_forward_hook(hook, with_kwargs=True)


def spy_on_batch_select(monkeypatch, wrong: bool = False) -> list[list[int]]:
    """Record which rows each `batch_select_indices` keeps (`wrong`: keep them in reverse order, a
    negative control: each row would then continue from another row's cache)."""
    calls, select = [], DynamicCache.batch_select_indices

    def spy(cache, indices):
        calls.append(indices.tolist())
        return select(cache, indices.flip(0) if wrong else indices)
    monkeypatch.setattr(DynamicCache, "batch_select_indices", spy)
    return calls


def ending_prompts():
    rng = random.Random(3)
    return [[rng.randrange(2, BT) for _ in range(k)] for k in (3, 11, 6, 1, 4, 8, 2, 5)]


def batched_and_single(model, semantics):
    """8 prompts, greedy with the BT rule hook, rows ending at different steps."""
    prompts = ending_prompts()
    handle = bt_rule_hook(model, ends=True)
    try:
        kw = dict(max_new_tokens=40, backtrack_id=BT, eos_token_id=EOS, semantics=semantics,
                  guards=LoopGuards(max_backtracks=100, max_backtracks_per_position=100), record_logits=True)
        return generate(model, prompts, **kw), [generate(model, [p], **kw)[0] for p in prompts]
    finally:
        handle.remove()


@pytest.mark.parametrize("semantics", ["rewind", "keep"])
def test_a_sampled_row_is_the_same_whether_finished_rows_leave_or_not(model, semantics, monkeypatch):
    """Sampling draws its random numbers for the whole batch, so finished rows leaving the batch
    (generate.LEAVE_AT) changes no sample: the same traces and logits as a batch that keeps them."""
    import halluc.inference.generate as generation

    def run(seed):
        handle = bt_rule_hook(model, ends=True)
        try:
            return generate(model, ending_prompts(), max_new_tokens=40, backtrack_id=BT, eos_token_id=EOS,
                            semantics=semantics, sampling=Sampling(1.0, 0.95, seed), record_logits=True,
                            guards=LoopGuards(max_backtracks=100, max_backtracks_per_position=100))
        finally:
            handle.remove()

    selected = spy_on_batch_select(monkeypatch)
    leaving = {seed: run(seed) for seed in range(3)}
    assert selected and {g.stop for gens in leaving.values() for g in gens} == {"eos", "length"}
    monkeypatch.setattr(generation, "LEAVE_AT", 2.0)  # finished rows stay to the end
    for seed, gens in leaving.items():
        staying = run(seed)
        assert [g.trace for g in gens] == [g.trace for g in staying]
        for a, b in zip(gens, staying):
            assert (torch.stack(a.logits) - torch.stack(b.logits)).abs().max() < 1e-4
    assert len({tuple(g.trace) for gens in leaving.values() for g in gens}) > 8  # the seeds sample differently


def test_drawing_only_for_the_rows_left_would_change_samples(model, monkeypatch):
    """Negative control of the test above: random numbers drawn for the rows still in the batch (as
    torch.multinomial on the smaller batch would) change what the rows sample after others finished."""
    import halluc.inference.generate as generation

    choose = generation.choose
    monkeypatch.setattr(generation, "choose", lambda logits, sampling, rng, draws=None: choose(logits, sampling, rng))

    def run(seed):
        handle = bt_rule_hook(model, ends=True)
        try:
            return generate(model, ending_prompts(), max_new_tokens=40, backtrack_id=BT, eos_token_id=EOS,
                            sampling=Sampling(1.0, 0.95, seed),
                            guards=LoopGuards(max_backtracks=100, max_backtracks_per_position=100))
        finally:
            handle.remove()

    leaving = [run(seed) for seed in range(3)]
    monkeypatch.setattr(generation, "LEAVE_AT", 2.0)
    assert any([g.trace for g in gens] != [g.trace for g in run(seed)] for seed, gens in enumerate(leaving))


@pytest.mark.parametrize("semantics", ["rewind", "keep"])
def test_batched_equals_one_by_one(model, semantics, monkeypatch):
    """Each row of a batch generates what it generates alone, also after finished rows left the
    batch and the cache (batch_select_indices)."""
    selected = spy_on_batch_select(monkeypatch)
    batched, single = batched_and_single(model, semantics)
    assert selected and all(len(kept) < 8 for kept in selected)  # finished rows left mid-generation
    assert {g.stop for g in batched} == {"eos", "length"}
    assert sum(g.n_backtracks for g in batched) > 10
    assert len({tuple(g.trace) for g in batched}) == len(batched)  # different BT patterns per row
    for b, s in zip(batched, single):
        assert b.trace == s.trace and b.visible == s.visible == apply_backtrack(b.trace, BT)
        assert (b.n_backtracks, b.n_erased, b.token_forwards, b.stop) == (s.n_backtracks, s.n_erased,
                                                                          s.token_forwards, s.stop)
        assert (torch.stack(b.logits) - torch.stack(s.logits)).abs().max() < 1e-4
        if semantics == "rewind":
            assert b.token_forwards == b.prompt_len + len(b.trace) - (b.stop == "length")


@pytest.mark.parametrize("semantics", ["rewind", "keep"])
def test_rows_continuing_from_the_wrong_cache_rows_are_caught(model, semantics, monkeypatch):
    """Negative control of the test above: leaving finished rows with the rows misassigned changes
    what the remaining rows generate."""
    spy_on_batch_select(monkeypatch, wrong=True)
    batched, single = batched_and_single(model, semantics)
    assert any(b.trace != s.trace for b, s in zip(batched, single))


def hf_greedy(model, prompts, max_new_tokens, eos):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=PAD)
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[:row.index(eos)] if eos in row else row)
    return rows


def test_no_backtrack_equals_hf_greedy(model):
    prompts = [[5, 9, 13], [7, 2, 30, 31, 8, 22, 3], [40]]
    free = hf_greedy(model, prompts, 30, eos=None)
    assert all(BT not in row for row in free)
    eos = free[1][12]  # a token HF emits in row 1: exercises the EOS stop and ragged rows
    want = hf_greedy(model, prompts, 30, eos=eos)
    for bt in (None, BT):  # no BT in the vocab, and a BT the model never emits
        for semantics in ("keep", "rewind"):
            got = generate(model, prompts, max_new_tokens=30, backtrack_id=bt, eos_token_id=eos, pad_token_id=PAD,
                           semantics=semantics)
            assert [g.trace for g in got] == want
            assert [g.visible for g in got] == want
            assert got[1].stop == "eos" and len(got[1].trace) <= 12
    assert generate(model, prompts[:1], max_new_tokens=30, backtrack_id=None, eos_token_id=None)[0].trace == free[0]


@pytest.mark.parametrize("semantics", ["rewind", "keep"])
def test_loop_guards_stop_a_model_that_always_backtracks(model, semantics):
    handle = model.lm_head.register_forward_hook(lambda m, i, out: out.index_fill(-1, torch.tensor([BT]), 1e4))
    try:
        capped = generate(model, [[3, 4, 5]], max_new_tokens=50, backtrack_id=BT, eos_token_id=None,
                          semantics=semantics, guards=LoopGuards(max_backtracks=5, max_backtracks_per_position=100))[0]
        per_position = generate(model, [[3, 4, 5], [9]], max_new_tokens=60, backtrack_id=BT, eos_token_id=None,
                                semantics=semantics,
                                guards=LoopGuards(max_backtracks=1000, max_backtracks_per_position=2,
                                                  ban_erased_token=True))
    finally:
        handle.remove()
    assert capped.n_backtracks == 5 and len(capped.trace) == 50 and capped.stop == "length"
    assert capped.trace[:5] == [BT] * 5 and BT not in capped.trace[5:]
    for gen in per_position:
        assert gen.stop == "length" and gen.visible == apply_backtrack(gen.trace, BT)
        assert len(gen.visible) >= 10  # progress despite a BT-obsessed model
        erased_at = {}
        for run in backtrack_runs(gen.trace, BT):
            for index in range(len(run.after), len(run.before)):
                erased_at[index] = erased_at.get(index, 0) + 1
            after_run = run.start + run.length
            if after_run < len(gen.trace) and len(run.before) > len(run.after):
                assert gen.trace[after_run] != run.before[len(run.after)]  # the just-erased token is banned
        assert max(erased_at.values()) <= 2
        assert sum(t == BT for t in gen.trace[:3]) <= 2  # BTs with nothing visible are capped too (index -1)


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(model):
    prompts = [[5, 9, 13], [7, 2]]
    kw = dict(max_new_tokens=20, backtrack_id=BT, eos_token_id=None, semantics="rewind")
    a = generate(model, prompts, sampling=Sampling(temperature=1.0, seed=3), **kw)
    b = generate(model, prompts, sampling=Sampling(temperature=1.0, seed=3), **kw)
    c = generate(model, prompts, sampling=Sampling(temperature=1.0, seed=4), **kw)
    greedy = generate(model, prompts, **kw)
    nucleus = generate(model, prompts, sampling=Sampling(temperature=1.0, top_p=1e-6, seed=5), **kw)
    assert [g.trace for g in a] == [g.trace for g in b] != [g.trace for g in c]
    assert [g.trace for g in nucleus] == [g.trace for g in greedy]
    # the top token always stays however small top_p is; top_p = 0 (it kept nothing: token 0 at every step) is refused
    import torch

    from halluc.inference.token_choice import choose

    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 5.0]])
    assert choose(logits, Sampling(1.0, 1e-300, 0), torch.Generator().manual_seed(0)).tolist() == [1, 2]
    for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0)):
        with pytest.raises(ValueError, match="must be"):
            Sampling(**bad)


@pytest.mark.parametrize("semantics", ["keep", "rewind"])
def test_a_stop_token_emitted_as_the_last_allowed_token_is_a_stop_not_a_length_cut(model, semantics):
    """MCTS reads stop == "length" as a step still open (a dead end): a step that ends exactly at
    max_new_tokens must say "stop_token". Negative control: a non-stop last token is a length cut."""
    semi = 7
    kw = dict(backtrack_id=BT, eos_token_id=EOS, semantics=semantics, stop_after=frozenset({semi}))
    for max_new in (3, 4, 6):
        g = generate(model, [[5, 6]], max_new_tokens=max_new, forcing=Forcing([[9, 10, semi, 11]]), **kw)[0]
        assert (g.trace, g.stop) == ([9, 10, semi], "stop_token")
    g = generate(model, [[5, 6]], max_new_tokens=3, forcing=Forcing([[9, 10, 11, semi]]), **kw)[0]
    assert (g.trace, g.stop) == ([9, 10, 11], "length")


def test_forced_backtrack_rate_is_deterministic(model):
    kw = dict(max_new_tokens=80, backtrack_id=BT, eos_token_id=None, semantics="rewind",
              guards=LoopGuards(max_backtracks=0), forcing=Forcing(backtrack_rate=0.2, seed=1))
    a, b = generate(model, [[4, 5, 6]], **kw)[0], generate(model, [[4, 5, 6]], **kw)[0]
    assert a.trace == b.trace and 5 <= a.n_backtracks <= 30
    assert all(not (x == y == BT) for x, y in zip(a.trace, a.trace[1:]))  # forced runs have length 1
    assert a.token_forwards == 3 + 80 - 1  # exactly one token-forward per emitted token


def test_semantics_from_checkpoint(tmp_path, caplog):
    m = tiny_model()
    assert semantics_for(m) == "keep"  # no config.halluc
    m.config.halluc = {"attention": "block_errors", "positions": "rewound", "backtrack_token_id": BT}
    assert semantics_for(m) == "rewind"
    assert semantics_for(m, has_backtrack=False) == "keep"
    with caplog.at_level(logging.WARNING):
        assert semantics_for(m, "keep") == "keep"
    assert any("trained with attention=block_errors" in r.message for r in caplog.records)
    m.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert semantics_for(reloaded) == "rewind"
    m.config.halluc = {"attention": "causal", "positions": "original", "backtrack_token_id": BT}
    assert semantics_for(m) == "keep"
    with pytest.raises(ValueError):
        semantics_for(m, "crop")


# ---- evaluation --------------------------------------------------------------------------

def step_tokens(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_backtrack_metrics_on_handmade_traces(bt_tokenizer):
    tok, bt = bt_tokenizer, bt_tokenizer.convert_tokens_to_ids("<|BACKTRACK|>")
    problem = arith.make_split(1, (3, 3), seed=5)[0]
    first, rest = problem.steps[0], "".join(problem.steps[1:])
    head, right = first.rsplit("=", 1)[0] + "=", int(first.rsplit("=", 1)[1].split()[0])
    wrong = (right + 1) % 7
    enc = lambda s: step_tokens(tok, s)  # noqa: E731

    def score(trace):
        visible = apply_backtrack(trace, bt)
        gen = Generation(trace=trace, visible=visible, prompt_len=0, n_backtracks=trace.count(bt),
                         n_erased=len(trace) - trace.count(bt) - len(visible))
        return score_problem(arith, problem, gen, tok, bt)

    caught = score(enc(head) + enc(f" {wrong}") + [bt] + enc(f" {right} ;") + enc(rest))
    assert (caught.n_runs, caught.n_justified, caught.made_error, caught.caught_error) == (1, 1, True, True)
    assert caught.answer_correct and caught.full_solution and (caught.n_erased, caught.n_wasted) == (1, 2)
    needless = score(enc(head) + enc(f" {right}") + [bt] + enc(f" {right} ;") + enc(rest))
    assert (needless.n_runs, needless.n_justified, needless.made_error) == (1, 0, False)
    missed = score(enc(head) + enc(f" {wrong} ;") + enc(rest))
    assert (missed.n_runs, missed.made_error, missed.caught_error) == (0, True, False)
    # the error stays; the run erases only a later token of the next step
    late = enc(head) + enc(f" {wrong} ;") + enc(problem.steps[1])
    late_score = score(late + [bt] + enc(problem.steps[1][-1:]))
    assert (late_score.n_runs, late_score.n_justified, late_score.made_error, late_score.caught_error) == (1, 0, True,
                                                                                                          False)


def test_evaluate_arith_tiny_model_reports_backtracks(bt_tokenizer):
    tok = copy.deepcopy(bt_tokenizer)
    model = tiny_model(vocab=len(tok))
    model.config.halluc = {"attention": "block_errors", "positions": "rewound",
                           "backtrack_token_id": tok.convert_tokens_to_ids("<|BACKTRACK|>")}
    problems = arith.make_split(10, (2, 3), seed=9)
    bt = tok.convert_tokens_to_ids("<|BACKTRACK|>")
    bias = torch.zeros(len(tok))
    bias[bt] = 3.0  # a random tiny model never writes a BT: one that backtracks often (the metrics had nothing to count)
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, out: out + bias)
    try:
        result = evaluate_problems(model, tok, problems, arith, max_new_tokens=24, batch_size=4, desc="test",
                                   guards=LoopGuards(max_backtracks=3))
    finally:
        handle.remove()
    assert REQUIRED_KEYS <= set(result) and result["n"] == 10 and result["semantics"] == "rewind"
    for key in ("bt_precision", "bt_recall", "wasted_per_problem", "bt_runs_per_problem"):
        assert key in result
    assert 0 < result["bt_per_problem"] <= 3  # the guard's cap per problem
    # the first five problems, then up to five others that backtracked, each with its own count
    samples = result["samples"]
    assert [x["prompt"] for x in samples[:5]] == [p.prompt for p in problems[:5]]
    assert len(samples) > 5 and all(x["backtracks"] > 0 for x in samples[5:]) and len(samples) <= 10
    assert all(x["trace"].count("<|BACKTRACK|>") == x["backtracks"] for x in samples)  # counted from the trace
    assert "| split |" in markdown_table({"test": result})


def test_evaluate_recipe_cli_arith(bt_tokenizer, tmp_path, capsys):
    tok = copy.deepcopy(bt_tokenizer)
    model = tiny_model(vocab=len(tok))
    model.config.halluc = {"attention": "causal", "positions": "original", "backtrack_token_id": len(tok) - 1}
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    recipe = load_script("recipes/evaluate.py")
    report = recipe.main(["--model", str(tmp_path / "ckpt"), "--limit", "3", "--max-new-tokens", "12",
                          "--semantics", "rewind", "--out", str(tmp_path / "eval")])
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(saved["results"]) == {"test_id", "test_ood"} == set(report["results"])
    assert saved["results"]["test_id"]["semantics"] == "rewind" and saved["results"]["test_id"]["n"] == 3
    assert "test_ood" in (tmp_path / "eval" / "eval.md").read_text() and "| test_id |" in capsys.readouterr().out


def test_evaluate_gsm8k_five_problems(bt_tokenizer, gsm8k_test_file, tmp_path):
    tok = copy.deepcopy(bt_tokenizer)
    model = tiny_model(vocab=len(tok))
    problems = gsm8k.read_jsonl(gsm8k_test_file, limit=5)
    result = evaluate_problems(model, tok, problems, get_task("gsm8k"), max_new_tokens=16, batch_size=5)
    assert REQUIRED_KEYS <= set(result) and result["n"] == 5 and result["semantics"] == "keep"
    recipe = load_script("recipes/evaluate.py")
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    report = recipe.main(["--model", str(tmp_path / "ckpt"), "--task", "gsm8k", "--data", str(gsm8k_test_file),
                          "--limit", "5", "--max-new-tokens", "8"])
    assert report["results"]["test"]["n"] == 5 and (tmp_path / "ckpt" / "eval.md").exists()


def simulated_policy(problems, tok, bt, policy: str, seed: int = 0) -> dict:
    """The evaluation of hand-written traces (issue 23), step by step over each reference solution:
    damage_then_repair erases every right step, rewrites it wrong, erases that and rewrites it right;
    erase_every_step erases every step and rewrites it unchanged; honest writes one wrong step first
    and erases it at once (the positive control)."""
    from halluc.inference.evaluate import metrics_of

    rng = random.Random(seed)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    gens = []
    for p in problems:
        trace, slip = [], rng.randrange(len(p.steps))
        for i, step in enumerate(p.steps):
            right, wrong = ids(step), ids(arith.corrupt_step(p, i, rng) or step)
            if policy == "damage_then_repair":
                trace += right + [bt] * len(right) + wrong + [bt] * len(wrong) + right
            elif policy == "erase_every_step":
                trace += right + [bt] * len(right) + right
            else:
                trace += (wrong + [bt] * len(wrong) if i == slip else []) + right
        visible = apply_backtrack(trace, bt)
        gens.append(Generation(trace=trace, visible=visible, prompt_len=1, n_backtracks=trace.count(bt),
                               text=tok.decode(visible, skip_special_tokens=True)))
    return metrics_of(None, tok, problems, arith, gens, "keep")


def test_backtracking_over_right_text_is_not_detection_skill(bt_tokenizer, arith_problems):
    """Issue 23, item 1: under the old definitions a policy that damages and repairs every step scored
    recall 100% (and accuracy 100%); now recall counts only first-pass errors (there are none: n/a) and
    precision only first runs (none justified: 0%). An honest policy that slips once and erases the
    slip at once scores 100% on both."""
    from halluc.core.tokens import backtrack_id

    bt, problems = backtrack_id(bt_tokenizer), arith_problems[:200]
    damage = simulated_policy(problems, bt_tokenizer, bt, "damage_then_repair")
    assert damage["answer_acc"] == 1.0 and damage["bt_recall_any_segment"] == 1.0  # the old recall: fooled
    assert damage["bt_recall"] is None and damage["problems_with_error"] == 0 and damage["bt_precision"] == 0.0
    assert damage["later_repairs_per_problem"] >= 2.0  # its own damage, repaired: reported apart
    every = simulated_policy(problems, bt_tokenizer, bt, "erase_every_step")
    assert every["answer_acc"] == 1.0 and every["bt_recall"] is None and every["bt_precision"] == 0.0
    steps = sum(len(p.steps) for p in problems) / len(problems)
    assert every["runs_over_right_per_problem"] == pytest.approx(steps)  # a BT run after every right step
    assert damage["runs_over_right_per_problem"] == pytest.approx(steps)  # the erased wrong rewrites are justified
    honest = simulated_policy(problems, bt_tokenizer, bt, "honest")
    assert honest["answer_acc"] == 1.0 and honest["bt_recall"] == 1.0 and honest["bt_precision"] == 1.0
    assert honest["problems_with_error"] >= 190 and honest["later_repairs_per_problem"] == 0.0
    assert honest["runs_over_right_per_problem"] == 0.0


def test_backtrackings_own_effect_decodes_again_with_bt_banned(bt_tokenizer, monkeypatch):
    """Issue 23 (SCoRe-style): every evaluation of a model with a BT token decodes again with BT banned,
    same weights and sampling seed, and reports wrong->right and right->wrong per problem. Control: a
    model whose BTs are already banned gets no effect (0 and 0)."""
    import halluc.inference.evaluate as evaluation
    from halluc.inference.evaluate import metrics_of

    tok = copy.deepcopy(bt_tokenizer)
    bt = tok.convert_tokens_to_ids("<|BACKTRACK|>")
    model = tiny_model(vocab=len(tok))
    bias = torch.zeros(len(tok))
    bias[bt] = 3.0  # a model that backtracks often
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, out: out + bias)
    calls = []
    original = evaluation.generate_text
    monkeypatch.setattr(evaluation, "generate_text", lambda *a, **kw: calls.append(kw) or original(*a, **kw))
    problems = arith.make_split(8, (2, 3), seed=5)
    sampling = Sampling(temperature=1.0, seed=11)
    try:
        result = evaluate_problems(model, tok, problems, arith, max_new_tokens=20, batch_size=8, sampling=sampling)
        control = evaluate_problems(model, tok, problems, arith, max_new_tokens=20, batch_size=8, sampling=sampling,
                                    guards=LoopGuards(max_backtracks=0))
    finally:
        handle.remove()
    assert [c["guards"].max_backtracks for c in calls] == [32, 0, 0, 0] and all(c["sampling"] == sampling for c in calls)
    per = result["per_problem"]
    assert per["bt_gain"] == [a - b for a, b in zip(per["answer_correct"], per["answer_correct_bt_banned"])]
    assert result["bt_per_problem"] > 0 and {"answer_acc_bt_banned", "wrong_to_right", "right_to_wrong"} <= set(result)
    assert control["wrong_to_right"] == control["right_to_wrong"] == 0.0
    assert control["answer_acc"] == control["answer_acc_bt_banned"]
    # the counts on known outcomes: allowed right/right/wrong/wrong vs banned right/wrong/right/wrong
    gens = [Generation(trace=[], visible=[], prompt_len=1, text=t) for t in
            [problems[0].solution, problems[1].solution, "x", "x"]]
    m = metrics_of(model, tok, problems[:4], arith, gens, "keep", banned=[True, False, True, False])
    assert (m["answer_acc"], m["answer_acc_bt_banned"], m["wrong_to_right"], m["right_to_wrong"]) == (0.5, 0.5, 0.25, 0.25)
    assert m["per_problem"]["bt_gain"] == [0, 1, -1, 0]


def test_copies_of_a_prompt_in_different_batches_draw_different_samples(lab_tokenizer, arith_problems):
    """Best-of-N lays the n copies of a prompt side by side; with n > batch_size every batch was seeded
    alike, so copy i and copy i + batch_size were the same sample. Negative control: one seed for
    every batch (the old behaviour) repeats them."""
    from halluc.core.model import tiny_llama
    from halluc.inference import generate as gen_module
    from halluc.inference.generate import generate_text

    torch.manual_seed(0)
    tok = lab_tokenizer
    model = tiny_llama(len(tok), hidden=32, layers=1, heads=2, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id)
    n, batch = 16, 8
    kw = dict(max_new_tokens=20, batch_size=batch, sampling=Sampling(1.0, 1.0, 0))
    texts = [g.text for g in generate_text(model, tok, [arith_problems[0].prompt] * n, **kw)]
    assert sum(texts[i] == texts[i + batch] for i in range(batch)) <= 1 and len(set(texts)) > batch
    again = [g.text for g in generate_text(model, tok, [arith_problems[0].prompt] * n, **kw)]
    assert again == texts  # still seeded
    with pytest.MonkeyPatch.context() as m:
        m.setattr(gen_module, "batch_sampling", lambda sampling, start: sampling)
        repeated = [g.text for g in generate_text(model, tok, [arith_problems[0].prompt] * n, **kw)]
    assert repeated[:batch] == repeated[batch:]
