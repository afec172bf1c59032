"""Generate from your own prompts with a trained checkpoint (or adapter), backtracking included.

    python recipes/generate.py model=runs/masked_sft/checkpoint prompt="a = 4 , b = a + 2 . b ?"
    python recipes/generate.py model=DIR prompts_file=prompts.txt temperature=0.7 json=out.jsonl
    python recipes/generate.py model=runs/gsm8k/checkpoint prompts_file=test.jsonl   # GSM8K rows: "question"

Settings are key=value as in every recipe (`--key value` reads too); `--help` lists them.
For every prompt it prints the visible text (what a reader sees), the raw trace with each BT shown
as ⌫, the semantics used (keep / rewind, from the checkpoint's config.halluc unless semantics=)
and why generation stopped. json=FILE writes the same as one JSON object per line.
Each prompt is put to the model as the checkpoint was trained (template=auto): a GSM8K model gets
"Question: {prompt}\nAnswer:", a jsonl model its prompt_template; template=none sends it as given.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from halluc.core.config import NonNegativeFloat, NonNegativeInt, PositiveInt, Texts, TopP, load_config
from halluc.inference.decoding import LoopGuards
from halluc.core.inputs import check_input_file, check_model_path, check_writable_folder, run_cli

log = logging.getLogger("generate")
SHOWN_BT = "⌫"


@dataclass
class Config:
    model: str | None = None              # a checkpoint or adapter folder saved by halluc (or any HF model)
    base: str | None = None               # an adapter's base folder, if not where it was at training
    prompt: Texts = field(default_factory=list)  # one prompt (commas and all), or a YAML list of quoted ones: prompt='["a = 1 , a ?", "b = 2 , b ?"]'
    prompts_file: str | None = None       # a text file, one prompt per line; or .jsonl, a "prompt" or "question" per row
    template: str = "auto"                # auto: as the checkpoint was trained (see `prompt_template`); none; or a text with {prompt}
    max_new_tokens: PositiveInt = 192
    semantics: Literal["keep", "rewind"] | None = None  # default: from the checkpoint
    temperature: NonNegativeFloat = 0.0   # 0: greedy
    top_p: TopP = 1.0
    seed: int = 0
    max_backtracks: NonNegativeInt = LoopGuards.max_backtracks
    json: str | None = None               # also write the results here (jsonl)

    def check(self) -> None:
        if not self.model:
            raise ValueError("give model=DIR: a checkpoint or adapter folder")
        if not self.prompt and not self.prompts_file:
            raise ValueError("give prompt=TEXT (one or a list) or prompts_file=FILE")
        if self.template not in ("auto", "none") and template_parts(self.template) is None:
            raise ValueError(f"template={self.template!r}: give auto, none, or a text whose one field is {{prompt}} "
                             "(literal braces doubled, as in str.format)")
        for name in ("model", "base"):
            if getattr(self, name):
                try:
                    check_model_path(getattr(self, name), name)
                except FileNotFoundError as e:
                    raise ValueError(str(e)) from None
        if self.prompts_file:
            check_input_file(self.prompts_file, "prompts_file")
        if self.json:
            check_writable_folder(str(Path(self.json).parent), "json")


def parse_args(argv=None) -> Config:
    """The settings: key=value or --key value (the flags of earlier versions still read), checked
    before any ML library loads; the prompts of prompts_file join `prompt`."""
    cfg = load_config(Config, argv)
    if cfg.prompts_file:
        cfg.prompt += read_prompts(cfg.prompts_file)
    return cfg


def read_prompts(path: str) -> list[str]:
    """The prompts of a file: a .jsonl file's "prompt" (else "question": GSM8K rows) of each row, which may
    span lines; any other file's non-blank lines, one prompt each. Errors name the file and line."""
    from halluc.tasks.jsonl import get_text, iter_jsonl_rows

    if Path(path).suffix != ".jsonl":
        return [line.rstrip("\n") for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    # "prompt" unless only "question" has a value (`datasets` writes a missing key as null)
    return [get_text(row, "question" if row.get("prompt") is None and row.get("question") is not None else "prompt",
                     path, n) for n, row in iter_jsonl_rows(path)]


def prompt_template(template: str, record: dict) -> str:
    """The text a prompt goes into, `{prompt}` where it goes: template=auto gives the one the checkpoint was
    trained with (its config.halluc record): GSM8K's "Question: {prompt}\nAnswer:", a jsonl task's
    prompt_template when it uses no other field, else the prompt as given (the arith lab has no template)."""
    from halluc.tasks import gsm8k

    if template != "auto":
        return "{prompt}" if template == "none" else template
    lab = record.get("lab") or {}
    if lab.get("task") == "gsm8k":
        return gsm8k.PROMPT_TEMPLATE.replace("{question}", "{prompt}")
    trained = lab.get("prompt_template", "{prompt}") if lab.get("task") == "jsonl" else "{prompt}"
    if template_parts(trained) is None:
        log.warning("the checkpoint's prompt_template %r uses other fields of its rows: prompts go as given "
                    "(template=TEXT with {prompt} sets one)", trained)
        return "{prompt}"
    return trained


def template_parts(template: str) -> tuple[str, str] | None:
    """(the text before, the text after) the one `{prompt}` of a str.format template, literal braces
    undoubled; None for any other template (no field, other fields, a conversion or format spec, bad braces)."""
    from string import Formatter

    try:
        parsed = list(Formatter().parse(template))
    except ValueError:
        return None
    fields = [(i, name, spec, conversion) for i, (_, name, spec, conversion) in enumerate(parsed) if name is not None]
    if [(name, spec, conversion) for _, name, spec, conversion in fields] != [("prompt", "", None)]:
        return None
    at = fields[0][0]
    return "".join(text for text, *_ in parsed[:at + 1]), "".join(text for text, *_ in parsed[at + 1:])


def put_in_template(prompt: str, template: str) -> str:
    """`template` with `prompt` in it, verbatim (as a jsonl task's prompt_template puts its field); a prompt
    already in the template's form, starting with the text before {prompt} and ending with the text after it,
    is left as it is (a GSM8K prompt written out whole, "Question: ...\nAnswer:", is not wrapped twice)."""
    head, tail = template_parts(template)
    whole = (head or tail.strip()) and prompt.startswith(head) and prompt.rstrip().endswith(tail.rstrip())
    return prompt if whole else head + prompt + tail


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # The ML libraries load here, after the arguments were checked.
    from halluc.training.checkpoint import load_trained, training_record
    from halluc.inference.generate import Sampling, generate_text
    from halluc.core.tokens import BACKTRACK_TOKEN

    model, tokenizer = load_trained(args.model, base=args.base)
    template = prompt_template(args.template, training_record(model))
    if template != "{prompt}":
        log.info("each prompt goes in the template %r (template=%s; template=none sends it as given)", template,
                 args.template)
    texts = [put_in_template(p, template) for p in args.prompt]
    gens = generate_text(model, tokenizer, texts, max_new_tokens=args.max_new_tokens, semantics=args.semantics,
                         sampling=Sampling(args.temperature, args.top_p, args.seed),
                         guards=LoopGuards(max_backtracks=args.max_backtracks))
    results = []
    for prompt, text, g in zip(args.prompt, texts, gens):
        trace = tokenizer.decode(g.trace, skip_special_tokens=False).replace(BACKTRACK_TOKEN, SHOWN_BT)
        results.append({"prompt": prompt, "input": text, "visible": g.text, "trace": trace, "backtracks": g.n_backtracks,
                        "erased": g.n_erased, "semantics": g.semantics, "stop": g.stop})
        print(f"\nprompt:    {prompt}\nvisible:   {g.text}\ntrace:     {trace}\n"
              f"           {g.n_backtracks} BT, {g.n_erased} erased, semantics {g.semantics}, stop {g.stop}")
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results), encoding="utf-8")
        print(f"\n{len(results)} results: {args.json}")
    return results


if __name__ == "__main__":
    run_cli(main)
