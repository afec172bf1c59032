"""lm-evaluation-harness support: a model class that decodes with backtracking and answers with
the visible text, and local task definitions (halluc/inference/harness_tasks/) over GSM8K jsonl files.

    python -m halluc.inference.harness run --model halluc --model_args pretrained=runs/masked_sft/checkpoint \\
        --tasks halluc_gsm8k --include_path halluc/inference/harness_tasks --limit 50

`python -m halluc.inference.harness` is lm_eval's own command line with the `halluc` model registered
(lm-eval 0.4.x finds models only by import; releases with plugin entry points find it through
the `lm_eval.models` entry point in pyproject.toml, so there `lm_eval run --model halluc` works).
The model takes `pretrained` (a checkpoint or adapter folder saved by halluc, or any HF model;
`base` for an adapter whose base moved),
`semantics` (keep / rewind, default: from the checkpoint), `batch_size` and `max_gen_toks`.
Only `generate_until` tasks are supported: a likelihood of text that may contain backtracks is
not defined by one forward pass, so the log-likelihood requests raise.
"""
from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from halluc.training.checkpoint import load_trained
from halluc.inference.generate import LoopGuards, Sampling, generate_text


@register_model("halluc")
class HallucLM(LM):
    def __init__(self, pretrained: str, semantics: str | None = None, batch_size: int | str = 64,
                 max_gen_toks: int = 256, max_backtracks: int = LoopGuards.max_backtracks, base: str | None = None,
                 **kwargs):
        super().__init__()
        self.model, self.tokenizer = load_trained(pretrained, base=base)
        self.model.eval()
        self.semantics = semantics
        self.batch_size = 64 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.guards = LoopGuards(max_backtracks=int(max_backtracks))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request is (context, gen_kwargs); the answer is the visible text (BTs applied), cut
        at the first `until` string. Requests are grouped by their generation settings."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            context, kwargs = request.args
            key = (int(kwargs.get("max_gen_toks", self.max_gen_toks)), float(kwargs.get("temperature", 0.0) or 0.0),
                   bool(kwargs.get("do_sample", False)))
            groups.setdefault(key, []).append(i)
        for (max_new, temperature, do_sample), indices in groups.items():
            sampling = Sampling(temperature=temperature if do_sample else 0.0)
            gens = generate_text(self.model, self.tokenizer, [requests[i].args[0] for i in indices],
                                 max_new_tokens=max_new, batch_size=self.batch_size, semantics=self.semantics,
                                 sampling=sampling, guards=self.guards, desc="lm_eval halluc")
            for i, g in zip(indices, gens):
                out[i] = cut_at(g.text, requests[i].args[1].get("until") or [])
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("the halluc model answers generate_until tasks only (decoded with backtracking)")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("the halluc model answers generate_until tasks only (decoded with backtracking)")


def cut_at(text: str, until: list[str] | str) -> str:
    """`text` up to the first of the stop strings (as lm_eval's own models do)."""
    for stop in [until] if isinstance(until, str) else until:
        if stop and stop in text:
            text = text[:text.index(stop)]
    return text


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()  # with HallucLM registered by this module's import


if __name__ == "__main__":
    main()
