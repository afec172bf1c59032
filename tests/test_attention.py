"""The edit-tree structure (halluc.structure.attention) and packing (halluc.structure.packing), no model."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from halluc.structure.attention import dense_mask, edit_tree, pad_end, position_ids, pred_pos, visible_keys
from halluc.core.example import IGNORE_INDEX, Role, apply_backtrack
from halluc.structure.packing import collate, layout_example, layout_two_branch, pack, pack_examples

LETTER = {"P": Role.PROMPT, "K": Role.KEPT, "E": Role.ERROR, "B": Role.BACKTRACK, "C": Role.CORRECTION}


def roles_of(text: str) -> list[int]:
    return [int(LETTER[c]) for c in text]


def example_of(text: str, first_id: int = 10) -> dict:
    roles = roles_of(text)
    ids = [3 if r == Role.BACKTRACK else first_id + i for i, r in enumerate(roles)]
    labels = [IGNORE_INDEX if r in (Role.PROMPT, Role.ERROR) else t for t, r in zip(ids, roles)]
    return {"input_ids": ids, "labels": labels, "roles": roles}


def mask_picture(end) -> list[str]:
    """Rows = queries, columns = keys; '#' = may attend."""
    m = dense_mask(np.asarray(end)).numpy()
    return ["".join("#" if x else "." for x in row) for row in m]


# ---------------------------------------------------------------- golden structures

def test_one_error_run():
    end, depth = edit_tree(roles_of("PPKEBCK"))
    assert end.tolist() == [7, 7, 7, 5, 5, 7, 7]
    assert depth.tolist() == [0, 1, 2, 3, 4, 3, 4]
    assert mask_picture(end) == [
        "#......",
        "##.....",
        "###....",
        "####...",   # E sees the context
        "#####..",   # B sees the error
        "###..#.",   # C sees neither E nor B
        "###..##",
    ]
    assert position_ids(depth=depth, scheme="rewound").tolist() == [0, 1, 2, 3, 4, 3, 4]
    assert position_ids(roles=roles_of("PPKEBCK"), scheme="original").tolist() == list(range(7))


def test_causal_mode_sees_everything():
    end, depth = edit_tree(roles_of("PPKEBCK"), mode="causal")
    assert end.tolist() == [7] * 7
    assert depth.tolist() == list(range(7))
    assert mask_picture(end)[5] == "######."


def test_two_runs():
    end, depth = edit_tree(roles_of("PKEBCEEBBC"))
    assert end.tolist() == [10, 10, 4, 4, 10, 9, 9, 9, 9, 10]
    assert depth.tolist() == [0, 1, 2, 3, 2, 3, 4, 5, 6, 3]
    pic = mask_picture(end)
    assert pic[8] == "##..#####."  # the second run's last BT: sees its errors, not the first run
    assert pic[9] == "##..#....#"  # final correction: prompt, K, first correction, itself


def test_run_deleting_kept_tokens():
    # Three BTs erase E and the two KEPT tokens before it: all of them leave the path.
    end, depth = edit_tree(roles_of("PKKEBBBCC"))
    assert end.tolist() == [9, 7, 7, 7, 7, 7, 7, 9, 9]
    assert depth.tolist() == [0, 1, 2, 3, 4, 5, 6, 1, 2]
    assert visible_keys(end, 7).tolist() == [0, 7]


def test_prompt_is_never_popped():
    end, depth = edit_tree(roles_of("PPBK"))
    assert end.tolist() == [4, 4, 3, 4]
    assert visible_keys(end, 3).tolist() == [0, 1, 3]


def test_two_branches_golden():
    prompt = {"input_ids": [10, 11], "roles": roles_of("PP")}
    chosen = example_of("KEBC", 20)
    rejected = example_of("KK", 30)
    for d in (chosen, rejected):
        d["labels"] = list(d["input_ids"])
    u = layout_two_branch(prompt, chosen, rejected, positions="rewound")
    assert u.input_ids.tolist() == [10, 11, 20, 21, 3, 23, 30, 31]
    assert u.attn_end.tolist() == [8, 8, 6, 5, 5, 6, 8, 8]
    assert u.pred_pos.tolist() == [-1, 0, 1, 2, 3, 4, 1, 6]  # B's first token from the prompt's last
    assert u.position_ids.tolist() == [0, 1, 2, 3, 4, 3, 2, 3]
    assert u.branches == [(2, 6), (6, 8)]
    assert mask_picture(u.attn_end)[6] == "##....#."  # B sees the prompt only
    orig = layout_two_branch(prompt, chosen, rejected, positions="original")
    assert orig.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 2, 3]


def test_pack_three_examples_golden():
    exs = [example_of("PKEBC"), example_of("PKK"), example_of("PPKK")]
    res = pack_examples(exs, max_len=8, positions="rewound")
    # Best fit decreasing: 5 opens row 0, 4 does not fit there (3 left) and opens row 1,
    # 3 fills row 0 exactly.
    assert [len(r["input_ids"]) for r in res.rows] == [8, 4]
    row = res.rows[0]
    assert row["attn_end"].tolist() == [5, 5, 4, 4, 5, 8, 8, 8]
    assert row["position_ids"].tolist() == [0, 1, 2, 3, 2, 0, 1, 2]
    assert row["pred_pos"].tolist() == [-1, 0, 1, 2, 3, -1, 5, 6]
    assert row["labels"][[0, 5]].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    assert row["unit_starts"].tolist() == [0, 5]
    assert (res.n_units, res.n_dropped, res.n_tokens) == (3, 0, 12)
    assert res.real_fraction == pytest.approx(12 / 16)


def test_pack_drops_overlong_and_counts():
    res = pack_examples([example_of("PKK"), example_of("PKKKKKKKKK")], max_len=5)
    assert (res.n_units, res.n_dropped) == (1, 1)


def test_collate_pads_with_self_only_positions():
    res = pack_examples([example_of("PKEBC"), example_of("PKK")], max_len=5)
    batch = collate(res.rows)
    assert batch["attn_end"][1].tolist() == [3, 3, 3, 4, 5]
    assert batch["is_real"][1].tolist() == [True, True, True, False, False]
    assert batch["labels"][1, 3:].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    mask = dense_mask(batch["attn_end"])
    assert mask.shape == (2, 1, 5, 5)
    assert mask[1, 0, :3, 3:].sum() == 0 and mask[1, 0, 3:, :3].sum() == 0
    assert mask[1, 0].sum(-1).min() >= 1  # every row attends somewhere: no NaN


def test_dense_mask_float_is_additive():
    end = np.array([3, 2, 3])
    f = dense_mask(end, dtype=torch.float32)
    b = dense_mask(end)
    assert torch.equal(f == 0, b)
    assert (f[~b] == torch.finfo(torch.float32).min).all()


def test_pad_end_and_pred_pos():
    assert pad_end(np.array([2, 2]), 4).tolist() == [2, 2, 3, 4]
    assert pred_pos(5, [0, 3], [-1, 1]).tolist() == [-1, 0, 1, 1, 3]


# ---------------------------------------------------------------- properties

traces = st.tuples(
    st.integers(0, 4),                                               # prompt length
    st.lists(st.sampled_from([Role.KEPT, Role.ERROR, Role.CORRECTION, Role.BACKTRACK]), max_size=40),
)


def expected_visible(prompt_len: int, roles: list[int], q: int) -> list[int]:
    """What `apply_backtrack` leaves visible after token q (indices stand in for ids)."""
    response = [-1 if r == Role.BACKTRACK else j for j, r in enumerate(roles[: q + 1]) if j >= prompt_len]
    return list(range(min(prompt_len, q + 1))) + apply_backtrack(response, -1)


@settings(max_examples=300, deadline=None)
@given(traces)
def test_tree_matches_deletion_semantics(trace):
    prompt_len, response = trace
    roles = [int(Role.PROMPT)] * prompt_len + [int(r) for r in response]
    end, depth = edit_tree(roles)
    for q, r in enumerate(roles):
        seen = visible_keys(end, q).tolist()
        if r != Role.BACKTRACK:
            assert seen == expected_visible(prompt_len, roles, q)
            assert depth[q] == len(seen) - 1  # rewound position = index in the clean text
        else:
            # A BT sees what was visible before its run, plus the run so far.
            s = q
            while s > 0 and roles[s - 1] == Role.BACKTRACK:
                s -= 1
            before = expected_visible(prompt_len, roles, s - 1) if s > 0 else []
            assert seen == before + list(range(s, q + 1))
            assert depth[q] == len(seen) - 1
    causal_end, _ = edit_tree(roles, mode="causal")
    assert all(visible_keys(causal_end, q).tolist() == list(range(q + 1)) for q in range(len(roles)))


@settings(max_examples=60, deadline=None)
@given(st.lists(traces, min_size=1, max_size=6), st.integers(8, 60))
def test_packing_never_attends_across_examples(trace_list, max_len):
    exs = []
    for prompt_len, response in trace_list:
        text = "P" * prompt_len + "".join({Role.KEPT: "K", Role.ERROR: "E", Role.CORRECTION: "C",
                                           Role.BACKTRACK: "B"}[r] for r in response)
        if text:
            exs.append(example_of(text))
    res = pack_examples(exs, max_len)
    assert res.n_units + res.n_dropped == len(exs)
    for row in res.rows:
        starts = list(row["unit_starts"]) + [len(row["input_ids"])]
        assert len(row["input_ids"]) <= max_len
        for s, e in zip(starts, starts[1:]):
            local = row["attn_end"][s:e]
            assert ((local > np.arange(s, e)) & (local <= e)).all()
            assert row["position_ids"][s] == 0 and row["pred_pos"][s] == -1 and row["labels"][s] == IGNORE_INDEX


def test_pack_real_fraction_on_synthetic_lengths():
    rng = np.random.default_rng(0)
    exs = [example_of("P" * 8 + "K" * int(n)) for n in rng.integers(20, 400, size=300)]
    res = pack([layout_example(e) for e in exs], 2048)
    assert res.real_fraction >= 0.95
