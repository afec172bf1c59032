"""TRL's PRMTrainer.tokenize_row, verbatim from trl 0.24.0 (trl/trainer/prm_trainer.py, Apache-2.0,
Copyright 2020-2025 The HuggingFace Team): the oracle for "halluc's stepwise rows read the same in
TRL's PRM trainer". TRL 1.x no longer ships the PRM trainer, so the function is kept here, test-only.
"""
from itertools import chain


def tokenize_row(
    features,
    tokenizer,
    step_separator,
    max_length,
    max_prompt_length,
    max_completion_length,
    train_on_last_step_only,
    is_eval,
):
    r"""
    Tokenize a row of the dataset.

    Args:
        features (`dict[str, str]`):
            Row of the dataset, should contain the keys `"prompt"`, `"completions"`, and `"labels"`.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Tokenizer used to process the data.
        step_separator (`str`):
            Separator between steps in the completion.
        max_length (`int` or `None`):
           Maximum length of the sequences (prompt + completion). If `None`, the sequences are not truncated.
        max_prompt_length (`int` or `None`):
            Maximum length of the prompt. If `None`, the prompt is not truncated.
        max_completion_length (`int` or `None`):
            Maximum length of the completion sequences. If `None`, the completion sequences are not truncated.
        train_on_last_step_only (`bool`):
            Whether to train only on the last step. If `True`, the labels are `-100` for all tokens except the last
            token of the completion.
        is_eval (`bool`):
            Whether the function is used to tokenize samples from a training or an evaluation dataset. Used only if
            `train_on_last_step_only` is set to `True`.

    Returns:
        `dict[str, list[int]]`:
            Tokenized sequences with the keys `"input_ids"`, and `"labels".

    Example:
    ```python
    >>> from transformers import AutoTokenizer

    >>> tokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen2.5-0.5B")
    >>> features = {
    ...     "prompt": "Which number is larger, 9.8 or 9.11?",
    ...     "completions": ["11 is greater than 8.", "Hence, 9.11 > 9.8."],
    ...     "labels": [True, False],
    ... }
    >>> PRMTrainer.tokenize_row(
    ...     features, tokenizer, "\n", max_completion_length=None, train_on_last_step_only=False, is_eval=False
    ... )
    {'input_ids': [23085, 1372, 374, 8131, 11, 220, 24, 13, 23, 476, 220, 24, 13, 16, 16, 30, 16, 16, 374, 7046, 1091, 220, 23, 13, 198, 39, 763, 11, 220, 24, 13, 16, 16, 861, 220, 24, 13, 23, 13, 198],
     'labels': [-100, -100, -100, -100, -100, -100, -100, -100, 1, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 0]}
    ```
    """
    # Tokenize the prompt and completions
    prompt_ids = tokenizer(features["prompt"], add_special_tokens=False)["input_ids"]
    completions_ids = [
        tokenizer(completion, add_special_tokens=False)["input_ids"] for completion in features["completions"]
    ]
    if train_on_last_step_only and not is_eval:
        labels = [-100] * (len(features["labels"]) - 1) + [int(features["labels"][-1])]
    else:
        labels = [int(label) for label in features["labels"]]

    # Get the ID of the separator token and add it to the completions
    separator_ids = tokenizer.encode(step_separator, add_special_tokens=False)
    completions_ids = [completion + separator_ids for completion in completions_ids]

    # Create the label
    labels = [[-100] * (len(completion) - 1) + [label] for completion, label in zip(completions_ids, labels)]

    # Join the completions and labels steps
    completion_ids = list(chain(*completions_ids))
    labels = list(chain(*labels))

    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids

    # Truncate prompt and completion sequences
    if max_prompt_length is not None:
        prompt_ids = prompt_ids[-max_prompt_length:]
    if max_completion_length is not None:
        completion_ids = completion_ids[:max_completion_length]
        labels = labels[:max_completion_length]

    input_ids = prompt_ids + completion_ids
    labels = [-100] * len(prompt_ids) + labels

    if max_length is not None:
        input_ids = input_ids[:max_length]
        labels = labels[:max_length]

    return {"input_ids": input_ids, "labels": labels}
