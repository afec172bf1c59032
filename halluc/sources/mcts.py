"""Technique 8: step-level MCTS with a backtrack action, and the training data its trees leave.

One tree per problem. A node is a solution prefix ending at a step boundary: the root is the empty
response, a child adds one step (the policy's tokens up to and including a step-end token; a step
ended by EOS finishes the solution and is terminal). Each iteration, for every tree at once:
  select   from the root, the child with the best score, down to a leaf:
             PUCT  Q + c * P * sqrt(N_parent) / (1 + N)   (P: the step's prior among its siblings,
                                                             from the policy's step log-probs)
             UCT   Q + c * sqrt(ln N_parent / N)
  expand   the leaf: K next steps sampled from the policy (one generator call for every tree's
           leaf); identical samples are one child (`count`);
  evaluate each new child: a finished solution gets the terminal reward (+1 right answer, -1
           wrong; a step cut by the length limits, or a prefix with no room left in the model's
           positions for another step, is a dead end, -1); an open one the verifier's
           P(right) as 2p - 1 (halluc.inference.verifiers: PRM, head or oracle), or the mean reward of
           `rollouts` finished continuations, or 0 with neither;
  backup   each new child counts as one visit of its own value, on every node up to the root
           (N += 1, W += v per child; Q = W / N). Selecting a terminal node backs up its reward again.
The backtrack action: when selection at a node leaves the child it went down last time for a
sibling whose Q is now higher, the search has abandoned that step and gone on from the parent.
The move is recorded (`Tree.backtracks`): the abandoned step is what a trace erases with BTs.

Data (`traces`, `step_pairs`, `step_values`): see their docstrings; every trace satisfies
apply_backtrack(response) == a solution the task verifier accepts (every step right, right answer).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from halluc.core.config import NonNegativeFloat, NonNegativeInt, PositiveInt, TopP
from halluc.core.example import Example, Role, common_prefix_len
from halluc.tasks import Problem

RULES = ("puct", "uct")


@dataclass
class Node:
    step: list[int]                 # token ids this node adds to its parent's prefix (the root: none)
    parent: int | None = None
    depth: int = 0
    prior: float = 1.0              # P(step) among its siblings: softmax of their step log-probs
    logprob: float = 0.0            # the policy's log-probability of the step's tokens
    count: int = 1                  # how often the step was sampled when its parent was expanded
    children: list[int] = field(default_factory=list)
    visits: int = 0
    value_sum: float = 0.0
    terminal: bool = False          # a finished solution, or a dead end (cut by a length limit)
    finished: bool = False          # the step ended with EOS
    reward: float | None = None     # terminal: +1 right answer, -1 otherwise
    verified: bool = False          # terminal: every step right and the right answer
    last_child: int | None = None   # the child selection went down last time (the backtrack action)

    @property
    def q(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0


@dataclass
class Backtrack:
    parent: int       # the node the search continued from
    abandoned: int    # the child it left
    to: int           # the sibling it took instead
    iteration: int


@dataclass
class Tree:
    problem: int
    prompt: list[int]
    nodes: list[Node] = field(default_factory=lambda: [Node(step=[])])
    backtracks: list[Backtrack] = field(default_factory=list)
    iterations: int = 0
    generated: int = 0      # tokens the policy generated for this tree (steps and rollouts)

    def path(self, i: int) -> list[int]:
        """Node indices from the root's child down to node i."""
        out = []
        while self.nodes[i].parent is not None:
            out.append(i)
            i = self.nodes[i].parent
        return out[::-1]

    def tokens(self, i: int) -> list[int]:
        return [t for j in self.path(i) for t in self.nodes[j].step]

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Tree":
        return Tree(problem=d["problem"], prompt=d["prompt"], nodes=[Node(**n) for n in d["nodes"]],
                    backtracks=[Backtrack(**b) for b in d["backtracks"]], iterations=d["iterations"],
                    generated=d.get("generated", 0))


def save_trees(path, trees: list[Tree]) -> None:
    """One tree per line (JSON)."""
    Path(path).write_text("".join(json.dumps(t.to_dict()) + "\n" for t in trees))


def load_trees(path) -> list[Tree]:
    return [Tree.from_dict(json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- select, expand, backup

def puct(q: float, prior: float, parent_visits: int, visits: int, c: float) -> float:
    return q + c * prior * math.sqrt(parent_visits) / (1 + visits)


def uct(q: float, parent_visits: int, visits: int, c: float) -> float:
    if visits == 0:
        return math.inf
    return q + c * math.sqrt(math.log(max(parent_visits, 1)) / visits)


def score(tree: Tree, child: int, rule: str, c: float) -> float:
    node, parent = tree.nodes[child], tree.nodes[tree.nodes[child].parent]
    if rule == "puct":
        return puct(node.q, node.prior, parent.visits, node.visits, c)
    if rule == "uct":
        return uct(node.q, parent.visits, node.visits, c)
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}")


def select(tree: Tree, rule: str = "puct", c: float = 1.5) -> int:
    """The leaf (a node without children, or a terminal one) the next simulation starts from; ties
    go to the earlier child. Records a backtrack wherever the pick leaves the child taken last time
    for a sibling whose Q is higher."""
    i = 0
    while tree.nodes[i].children and not tree.nodes[i].terminal:
        node = tree.nodes[i]
        best = max(node.children, key=lambda ch: (score(tree, ch, rule, c), -ch))
        last = node.last_child
        if last is not None and best != last and tree.nodes[last].q < tree.nodes[best].q:
            tree.backtracks.append(Backtrack(parent=i, abandoned=last, to=best, iteration=tree.iterations))
        node.last_child = best
        i = best
    return i


def expand(tree: Tree, leaf: int, candidates: list[tuple[list[int], float]]) -> list[int]:
    """Add the sampled steps (tokens, log-prob) below `leaf`, identical ones merged; the priors
    are the softmax of the distinct steps' log-probs. Returns the new children's indices."""
    merged: dict[tuple[int, ...], list] = {}
    for tokens, logprob in candidates:
        key = tuple(tokens)
        if key in merged:
            merged[key][1] += 1
        else:
            merged[key] = [logprob, 1]
    if not merged:
        return []
    top = max(lp for lp, _ in merged.values())
    z = sum(math.exp(lp - top) for lp, _ in merged.values())
    new = []
    for key, (logprob, count) in merged.items():
        tree.nodes.append(Node(step=list(key), parent=leaf, depth=tree.nodes[leaf].depth + 1,
                               prior=math.exp(logprob - top) / z, logprob=logprob, count=count))
        new.append(len(tree.nodes) - 1)
    tree.nodes[leaf].children.extend(new)
    return new


def backup(tree: Tree, node: int, value: float, visits: int = 1) -> None:
    """Add `visits` visits worth `value` in all to node and each of its ancestors."""
    i: int | None = node
    while i is not None:
        tree.nodes[i].visits += visits
        tree.nodes[i].value_sum += value
        i = tree.nodes[i].parent


# --------------------------------------------------------------------------- the data a tree leaves

@dataclass
class TraceData:
    failed_attempts: PositiveInt = 1      # bad sibling steps written (and erased) per trace
    per_problem: PositiveInt = 2          # traces per problem (its best verified solutions)
    bad_below: float = 0.0                # a step is judged bad when its value Q is below this
    pair_margin: NonNegativeFloat = 1.0   # step pairs: Q(chosen) - Q(rejected) at least this


def trace_rows(trees: list[Tree], bt_id: int, eos_id: int | None, data: TraceData, max_len: int,
               masked: bool = True) -> tuple[list[dict], int]:
    """(SFT rows of every tree's traces, in the format masked_sft reads, the number dropped): a
    trace longer than max_len, or with more BTs than generation's loop guard allows, is dropped."""
    from halluc.sources.data import labels_from_roles
    from halluc.inference.generate import LoopGuards

    longest_run = LoopGuards().max_backtracks  # generation never writes a longer BT run: nor may training
    rows, dropped = [], 0
    for t in trees:
        for ex in traces(t, bt_id, eos_id, data.failed_attempts, data.per_problem, data.bad_below):
            if len(ex.ids) > max_len or ex.roles.count(Role.BACKTRACK) > longest_run:
                dropped += 1
                continue
            rows.append({"input_ids": ex.ids, "roles": ex.roles, "labels": labels_from_roles(ex.ids, ex.roles, masked),
                         "problem": t.problem, "kind": "mcts", "correction": "search"})
    return rows, dropped


def judged_bad(node: Node, below: float = 0.0) -> bool:
    """A step the search judged bad: visited, and its value below `below`."""
    return node.visits > 0 and node.q < below


def traces(tree: Tree, bt_id: int, eos_id: int | None, failed_attempts: int = 1, per_tree: int = 2,
           bad_below: float = 0.0) -> list[Example]:
    """Stream-of-Search traces: for each verified solution in the tree (at most `per_tree`, best
    Q first), the solution with up to `failed_attempts` sibling steps the search judged bad written
    before the step that replaced them, each erased by BTs (abandoned steps first, at the
    shallowest depths). Like halluc.sources.own_errors.build, a bad step's tokens shared with the good
    step's start stay; only its divergent tail is the error. Solutions with no bad sibling on their
    path give no trace."""
    abandoned = {(b.parent, b.abandoned) for b in tree.backtracks}
    leaves = sorted((i for i, n in enumerate(tree.nodes) if n.terminal and n.verified),
                    key=lambda i: (-tree.nodes[i].q, i))
    out = []
    for leaf in leaves:
        path = tree.path(leaf)
        bad_at: dict[int, int] = {}
        for depth, good in enumerate(path):
            parent = tree.nodes[good].parent
            step = tree.nodes[good].step
            bads = [ch for ch in tree.nodes[parent].children  # a bad step that is a prefix of the good one has no error
                    if ch != good and judged_bad(tree.nodes[ch], bad_below)
                    and common_prefix_len(tree.nodes[ch].step, step) < len(tree.nodes[ch].step)]
            if bads and len(bad_at) < failed_attempts:
                bad_at[depth] = min(bads, key=lambda ch: ((parent, ch) not in abandoned, tree.nodes[ch].q, ch))
        if not bad_at:
            continue
        ex = Example().add(tree.prompt, Role.PROMPT)
        for depth, good in enumerate(path):
            step = tree.nodes[good].step
            if depth not in bad_at:
                ex.add(step, Role.KEPT)
                continue
            bad = tree.nodes[bad_at[depth]].step
            shared = common_prefix_len(bad, step)
            error = bad[shared:]
            ex.add(step[:shared], Role.KEPT).add(error, Role.ERROR).add([bt_id] * len(error), Role.BACKTRACK)
            ex.add(step[shared:], Role.CORRECTION)
        eos = [eos_id] if eos_id is not None else []
        ex.add(eos, Role.KEPT)
        ex.check(tree.tokens(leaf) + eos, bt_id)
        out.append(ex)
        if len(out) == per_tree:
            break
    return out


def step_pairs(tree: Tree, eos_id: int | None, margin: float = 1.0) -> list[dict]:
    """Step preference pairs in the DPO data format (halluc.structure.pairs): at every node with two or
    more visited children, prompt = question + prefix, chosen = the highest-Q step, rejected = the
    lowest-Q step, kept when chosen's Q is above 0, rejected's below and they differ by `margin`.
    A finished step ends with EOS."""
    out = []
    for i, node in enumerate(tree.nodes):
        kids = [ch for ch in node.children if tree.nodes[ch].visits]
        if len(kids) < 2 or node.terminal:
            continue
        hi = max(kids, key=lambda ch: (tree.nodes[ch].q, -ch))
        lo = min(kids, key=lambda ch: (tree.nodes[ch].q, ch))
        qh, ql = tree.nodes[hi].q, tree.nodes[lo].q
        if not (qh > 0 > ql and qh - ql >= margin):
            continue
        prefix = tree.tokens(i)
        chosen, rejected = _with_eos(tree.nodes[hi], eos_id), _with_eos(tree.nodes[lo], eos_id)
        out.append({"prompt_ids": tree.prompt + prefix,
                    "prompt_roles": [int(Role.PROMPT)] * len(tree.prompt) + [int(Role.KEPT)] * len(prefix),
                    "chosen_ids": chosen, "chosen_roles": [int(Role.KEPT)] * len(chosen),
                    "rejected_ids": rejected, "rejected_roles": [int(Role.KEPT)] * len(rejected),
                    "problem": tree.problem, "chosen_q": qh, "rejected_q": ql})
    return out


def _with_eos(node: Node, eos_id: int | None) -> list[int]:
    return node.step + ([eos_id] if node.finished and eos_id is not None else [])


def step_values(tree: Tree, problem: Problem, tokenizer) -> list[dict]:
    """Step values in the PRM data format (halluc.sources.step_labels, TRL's stepwise rows): one row per
    leaf of the tree (its path holds every ancestor's value), labels = Q > 0 per step, `values` = Q,
    `visits` = N; the token ids are the tree's own."""
    out = []
    for i, node in enumerate(tree.nodes):
        if i == 0 or node.children or not node.visits:
            continue
        path = tree.path(i)
        steps = [tree.nodes[j].step for j in path]
        out.append({"prompt": problem.prompt, "completions": [tokenizer.decode(s) for s in steps],
                    "labels": [tree.nodes[j].q > 0 for j in path], "prompt_ids": list(tree.prompt),
                    "completion_ids": steps, "values": [tree.nodes[j].q for j in path],
                    "visits": [tree.nodes[j].visits for j in path], "source": "mcts"})
    return out


# --------------------------------------------------------------------------- the search

@dataclass
class SearchConfig:
    nodes: PositiveInt = 48                 # node budget per problem (the root included)
    k: PositiveInt = 4                      # next steps sampled per expansion
    rule: Literal["puct", "uct"] = "puct"
    c: NonNegativeFloat = 1.5               # exploration constant (AlphaMath's c_puct)
    temperature: NonNegativeFloat = 1.0
    top_p: TopP = 1.0
    max_step_tokens: PositiveInt = 32       # a step still open after this many tokens is a dead end
    max_depth: PositiveInt = 12             # steps per solution; an open node this deep is a dead end
    rollouts: NonNegativeInt = 0            # >0: an open step's value is the mean reward of this many continuations
    rollout_tokens: PositiveInt = 192
    seed: int = 0
    batch_size: PositiveInt = 256           # rows per generator call


def tree_stats(trees: list[Tree]) -> dict:
    """What a search made, summed over its trees."""
    return {"problems": len(trees), "nodes": sum(len(t.nodes) for t in trees),
            "generated_tokens": sum(t.generated for t in trees),
            "verified_solutions": sum(n.verified for t in trees for n in t.nodes),
            "solved": sum(any(n.verified for n in t.nodes) for t in trees),
            "backtracks": sum(len(t.backtracks) for t in trees)}


def terminal_reward(task, problem: Problem, text: str) -> tuple[float, bool]:
    """(+1 if the answer is right else -1, whether every step is right too)."""
    report = task.verify_steps(problem, task.split_steps(text))
    return (1.0 if report.answer_correct else -1.0), bool(report.all_ok and report.answer_correct)


def search(model, tokenizer, task, problems: list[Problem], cfg: SearchConfig, verifier=None,
           trees: list[Tree] | None = None, progress: bool = True) -> list[Tree]:
    """Grow one tree per problem until each holds `cfg.nodes` nodes (or stops growing), batched
    across problems; `trees` continues earlier trees (resume). Module docstring."""
    from tqdm.auto import tqdm

    from halluc.inference.generate import LoopGuards, Sampling, generate
    from halluc.core.tokens import backtrack_id, has_backtrack
    from halluc.objectives.verifier_head import step_end_ids

    if cfg.rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {cfg.rule!r}")
    ends = step_end_ids(tokenizer, task.STEP_SEPARATOR)
    bt = backtrack_id(tokenizer) if has_backtrack(tokenizer) else None
    eos = tokenizer.eos_token_id
    if trees is None:
        trees = [Tree(problem=i, prompt=tokenizer(p.prompt)["input_ids"]) for i, p in enumerate(problems)]
    gen_kw = dict(backtrack_id=bt, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                  guards=LoopGuards(max_backtracks=0))  # the search does the backtracking

    def run(prompts, max_new, seed, stop_after=frozenset()):
        out = []
        for start in range(0, len(prompts), cfg.batch_size):
            out += generate(model, prompts[start:start + cfg.batch_size], max_new_tokens=max_new,
                            sampling=Sampling(cfg.temperature, cfg.top_p, seed + start), stop_after=stop_after,
                            record_logprobs=True, **gen_kw)
        return out

    # the model's positions: a prefix with no room for another step is a dead end, rollouts are cut
    limit = getattr(model.config, "max_position_embeddings", None) or math.inf

    def growing(t):
        return len(t.nodes) < cfg.nodes and t.iterations < cfg.nodes

    bar = tqdm(total=len(trees) * cfg.nodes, desc="mcts nodes", unit="node", disable=not progress)
    bar.update(sum(min(len(t.nodes), cfg.nodes) for t in trees))
    model.eval()
    while any(growing(t) for t in trees):
        leaves = []
        for t in trees:
            if not growing(t):
                continue
            leaf = select(t, cfg.rule, cfg.c)
            node = t.nodes[leaf]
            if not node.terminal and len(t.prompt) + len(t.tokens(leaf)) + cfg.max_step_tokens > limit:
                node.terminal, node.reward = True, -1.0
            if node.terminal:
                backup(t, leaf, node.reward, 1)
                t.iterations += 1
            else:
                leaves.append((t, leaf))
        if not leaves:
            continue
        seed = cfg.seed * 1_000_003 + sum(t.iterations for t in trees) * 7_919
        prompts = [t.prompt + t.tokens(leaf) for t, leaf in leaves for _ in range(cfg.k)]
        gens = run(prompts, cfg.max_step_tokens, seed, stop_after=frozenset(ends))
        new_nodes = []  # (tree, child)
        for n, (t, leaf) in enumerate(leaves):
            mine = gens[n * cfg.k:(n + 1) * cfg.k]
            t.generated += sum(len(g.trace) + (g.stop == "eos") for g in mine)
            stops = {tuple(g.visible): g.stop for g in mine}
            for child in expand(t, leaf, [(g.visible, sum(g.logprobs)) for g in mine]):
                node = t.nodes[child]
                stop = stops[tuple(node.step)]
                if stop == "eos":
                    text = tokenizer.decode(t.tokens(child), skip_special_tokens=True)
                    node.reward, node.verified = terminal_reward(task, problems[t.problem], text)
                    node.terminal = node.finished = True
                elif stop != "stop_token" or node.depth >= cfg.max_depth or not node.step:
                    node.terminal, node.reward = True, -1.0  # a step cut short, or too deep
                new_nodes.append((t, child))
        values = _open_values(cfg, verifier, run, task, problems, tokenizer, [(t, c) for t, c in new_nodes
                                                                             if not t.nodes[c].terminal], seed, limit)
        for t, child in new_nodes:
            node = t.nodes[child]
            v = node.reward if node.terminal else values[(id(t), child)]
            node.visits, node.value_sum = 1, v
            backup(t, node.parent, v, 1)
        for t, leaf in leaves:
            t.iterations += 1
        bar.n = sum(min(len(t.nodes), cfg.nodes) for t in trees)
        bar.refresh()
    bar.close()
    return trees


def _open_values(cfg, verifier, run, task, problems, tokenizer, items, seed, limit) -> dict:
    """Value in [-1, 1] of each open (non-terminal) new node: rollouts (cut at the model's
    positions `limit`: an unfinished rollout scores -1), else the verifier, else 0."""
    if not items:
        return {}
    if cfg.rollouts:
        prompts = [t.prompt + t.tokens(c) for t, c in items for _ in range(cfg.rollouts)]
        room = min(cfg.rollout_tokens, limit - max(map(len, prompts)))  # search left >= max_step_tokens
        gens = run(prompts, int(room), seed + 104_729)
        out = {}
        for n, (t, c) in enumerate(items):
            rewards = []
            for g in gens[n * cfg.rollouts:(n + 1) * cfg.rollouts]:
                t.generated += len(g.trace) + (g.stop == "eos")
                text = tokenizer.decode(t.tokens(c) + g.visible, skip_special_tokens=True)
                rewards.append(terminal_reward(task, problems[t.problem], text)[0] if g.stop == "eos" else -1.0)
            out[(id(t), c)] = sum(rewards) / len(rewards)
        return out
    if verifier is not None:
        scores = verifier([(t.prompt, t.tokens(c)) for t, c in items], list(range(len(items))))
        return {(id(t), c): 2 * float(p) - 1 for (t, c), p in zip(items, scores)}
    return {(id(t), c): 0.0 for t, c in items}
