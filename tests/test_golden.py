"""Pinned losses of the tiny recipe: a silent change of labels, masks, data or the loss cannot land.

The numbers were recorded (one thread, fixed seed) BEFORE the trainer was refactored to take an
objective, and every later change must reproduce them. A run trains a base for 150 steps, then
12 SFT steps logged every 3; the SFT losses depend on the base, the error data, the labels
(masked or not), the attention structure and the loss. If a change is *meant* to alter them,
re-record them and say why in the commit.
"""
import pytest
import torch
from conftest import load_script

COMMON = ["base.steps=150", "sft.steps=12", "base.batch_size=16", "sft.batch_size=16", "lab.train_size=400",
          "lab.sft_size=200", "lab.test_size=16", "tiny.hidden=32", "eval_max_new_tokens=40"]

GOLDEN = {
    # stock causal path: masked step errors
    "causal": ([], [2.004146099090576, 2.1304238637288413, 1.9812890688578289, 1.8073757489522297]),
    # edit-tree path: block_errors + rewound positions, packed rows. Re-recorded once, on purpose:
    # the base cache key now includes `pack`, so this configuration trains its own (packed) base
    # instead of reusing the causal one. From the causal base its SFT losses are unchanged
    # (1.897588, 1.787238, 1.764041, 1.769047 vs the first pins 1.897588, 1.787237, 1.764039, 1.769046).
    "block_errors": (["attention=block_errors", "positions=rewound", "pack=256"],
                     [1.8378281593322754, 1.7327885627746582, 1.7013139724731445, 1.7056973775227864]),
    # unmasked labels, random-token errors (2 tokens per site)
    "unmasked_random": (["masked=false", "errors.source=random", "errors.tokens_per_site=2"],
                        [2.224010944366455, 2.3758392333984375, 2.1363987922668457, 1.9734687805175781]),
}


@pytest.fixture(scope="module")
def base_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("golden-cache")  # the base is trained once for all three


@pytest.mark.parametrize("name", list(GOLDEN))
def test_recipe_losses_equal_the_pinned_values(name, tmp_path, base_cache):
    extra, expected = GOLDEN[name]
    recipe = load_script("recipes/masked_sft.py")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the summation order of one thread, as when the values were recorded
    try:
        report = recipe.main([f"output_dir={tmp_path}/out", f"cache_dir={base_cache}", *COMMON, *extra])
    finally:
        torch.set_num_threads(threads)
    steps, losses = zip(*report["sft_train"]["losses"])
    assert list(steps) == [3, 6, 9, 12]
    assert list(losses) == pytest.approx(expected, rel=0, abs=2e-5), (name, losses)


def test_a_changed_label_breaks_the_golden_values(tmp_path, base_cache):
    """Negative control: training the error tokens (unmasked) moves the causal losses off their pins."""
    recipe = load_script("recipes/masked_sft.py")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = recipe.main([f"output_dir={tmp_path}/out", f"cache_dir={base_cache}", *COMMON, "masked=false"])
    finally:
        torch.set_num_threads(threads)
    losses = [loss for _, loss in report["sft_train"]["losses"]]
    assert max(abs(a - b) for a, b in zip(losses, GOLDEN["causal"][1])) > 1e-3
