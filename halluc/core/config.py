"""Recipe settings: dataclasses filled from a YAML file, then `section.key=value` overrides.

    python recipes/masked_sft.py --config recipes/configs/masked_sft.yaml sft.steps=200 errors.source=random

Every value is checked as it is read, before anything trains: unknown keys, wrong types,
a value outside a `Literal[...]` (the allowed values are listed) or outside a `Range`
(e.g. `steps: Annotated[int, Range(0)]`) fail with the key and the file (or the command line)
named; then each settings dataclass's `check()` rejects combinations that cannot apply. This module imports no ML library, so a bad setting fails in well under a second.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml


@dataclass(frozen=True)
class Range:
    """Inclusive bounds for a number setting: `Annotated[int, Range(1)]` is a positive int."""

    low: float | None = None
    high: float | None = None

    def check(self, value) -> None:
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            lo = "-inf" if self.low is None else self.low
            hi = "inf" if self.high is None else self.high
            raise ValueError(f"must be in [{lo}, {hi}]")


class Verbatim:
    """Marks a list of free texts (prompts): one command-line value is one item, commas and all."""


class Escapes:
    """Marks a string setting whose backslash escapes are read (\\n, \\t, \\r, \\\\): a separator typed on
    a command line as lab.step_separator=\\n\\n is two newlines, not four characters."""


def unescape(text: str) -> str:
    """\\n, \\t, \\r and \\\\ as the characters they name; any other backslash stays."""
    import re

    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], text)


Texts = Annotated[list[str], Verbatim()]
Escaped = Annotated[str, Escapes()]
NonNegativeInt = Annotated[int, Range(0)]
PositiveInt = Annotated[int, Range(1)]
NonNegativeFloat = Annotated[float, Range(0)]
Fraction = Annotated[float, Range(0, 1)]
TopP = Annotated[float, Range(1e-6, 1)]  # nucleus sampling: 0 would keep no token


def load_config(cls, argv: list[str] | None = None, default_file: str | None = None):
    """Build `cls` from `--config FILE` (or `default_file`) and `key=value` / `--key value` args."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = default_file
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(f"settings (key=value or --key value; --config FILE for a YAML file), with defaults:\n"
                  f"{describe(cls(), explain=True)}")
            raise SystemExit(0)
        if arg == "--config":
            path, i = argv[i + 1], i + 2
            continue
        if "=" in arg:
            key, value = arg.lstrip("-").split("=", 1)
            i += 1
        elif arg.startswith("--") and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            key, value, i = arg[2:], "true", i + 1  # a bare --flag: a boolean setting switched on
        elif arg.startswith("--"):
            key, value, i = arg[2:], argv[i + 1], i + 2
        else:
            raise SystemExit(f"cannot read argument {arg!r}: use key=value or --key value")
        overrides.append((key.replace("-", "_"), value))
    cfg = cls()
    if path:
        if not Path(path).is_file():
            if path == default_file:  # a recipe's own defaults: configs/<recipe>.yaml beside it
                raise SystemExit(f"{path}: no such file: the recipe's defaults live there (copy another recipe's "
                                 f"config to it), or give --config FILE")
            raise SystemExit(f"--config {path}: no such file")
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise SystemExit(f"{path}: not readable as YAML: {e}") from None
        _apply_mapping(cfg, data, where=path, lines=_key_lines(text))
    for key, value in overrides:
        _set(cfg, key, value, where="command line", raw=True)
    _check(cfg, where=f"{path} + command line" if path else "command line")
    return cfg


CHECK_SETTINGS = "--check-settings"


def recipe_entry(config_cls, train, recipe_file: str):
    """(load, main) of a training recipe: `load(argv)` reads configs/<recipe>.yaml beside the recipe,
    then `--config FILE`, then key=value overrides, every value checked before any ML library loads;
    `main(argv)` runs `train` on them (`run_recipe`)."""
    default_file = str(Path(recipe_file).parent / "configs" / f"{Path(recipe_file).stem}.yaml")

    def load(argv: list[str]):
        return load_config(config_cls, argv, default_file=default_file)

    def main(argv=None):
        return run_recipe(load, train, argv)

    return load, main


def run_recipe(load, train, argv: list[str] | None = None):
    """A recipe's command line: the launcher's arguments stripped (the deepspeed launcher adds
    --local_rank), the settings loaded and checked by `load`, logging on, then `train(cfg)`.
    `RECIPE --check-settings` trains nothing: see `check_settings_lines`."""
    import logging

    from halluc.core.distributed import strip_launcher_args

    args = strip_launcher_args(sys.argv[1:] if argv is None else argv)
    if args == [CHECK_SETTINGS]:
        return check_settings_lines(load)
    cfg = load(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_progress_bars_in_files()
    return train(cfg)


def quiet_progress_bars_in_files() -> None:
    """Output going to a file (a Slurm log, `> run.log`): no progress bars, whose redraws filled such a
    log with carriage returns; the trainer's logged losses and the log lines still show progress.
    tqdm reads TQDM_DISABLE when it is first imported, so this runs before any ML library loads
    (TQDM_DISABLE=0 keeps the bars)."""
    import os

    if os.environ.get("TQDM_DISABLE") == "0":  # tqdm reads any non-empty value as "disable"
        os.environ["TQDM_DISABLE"] = ""
    elif not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")


def check_settings_lines(load, lines=None, out=None) -> None:
    """For tools that plan many runs of a recipe (tools/sweep.py) without importing it: every input
    line is one run's arguments as a JSON list; every output line is {"settings": the effective
    settings, flat} or {"error": why they fail}, in order. No ML library loads."""
    for line in lines if lines is not None else sys.stdin:
        if not line.strip():
            continue
        try:
            result = {"settings": flat_dict(json.loads(json.dumps(as_dict(load(json.loads(line))))))}
        except SystemExit as e:
            result = {"error": str(e)}
        print(json.dumps(result), file=out or sys.stdout, flush=True)


def _check(cfg, where: str, prefix: str = "") -> None:
    """Settings that only make sense together: each settings dataclass may define `check()`,
    raising ValueError; every one in the tree runs, innermost first, after all values are set."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if dataclasses.is_dataclass(item):
                _check(item, where, f"{prefix}{f.name}{f'[{i}]' if isinstance(value, list) else ''}.")
    if hasattr(cfg, "check"):
        try:
            cfg.check()
        except ValueError as e:
            raise SystemExit(f"{where}: {e}") from None


def _apply_mapping(cfg, data: dict, where: str, prefix: str = "", lines: dict[str, int] | None = None) -> None:
    """Set every value of a YAML file's mapping; an error names the file and the key's line."""
    node = cfg
    for p in filter(None, prefix.split(".")):
        node = getattr(node, p)
    for key, value in data.items():
        if isinstance(value, dict) and dataclasses.is_dataclass(getattr(node, key, None)):
            _apply_mapping(cfg, value, where, prefix + key + ".", lines)
        else:
            line = (lines or {}).get(f"{prefix}{key}")
            _set(cfg, prefix + key, value, f"{where}:{line}" if line else where)


def _key_lines(text: str) -> dict[str, int]:
    """{dotted key: its 1-based line} of a YAML text's nested mappings ({} if it does not compose)."""
    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    lines[prefix + str(key.value)] = key.start_mark.line + 1
                    walk(value, f"{prefix}{key.value}.")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


def _set(cfg, dotted: str, value, where: str, raw: bool = False) -> None:
    """Set one setting, checked. `raw`: a command-line string, read as YAML (numbers, lists, null)
    except where a string goes, which takes it as written (a prompt may hold ': ')."""
    *parents, name = dotted.split(".")
    target = cfg
    for p in parents:
        target = getattr(target, p, None)
        if not dataclasses.is_dataclass(target):
            raise SystemExit(f"{where}: unknown setting {dotted!r}\n{describe(cfg)}")
    fields = {f.name: f for f in dataclasses.fields(target)}
    if name not in fields:
        raise SystemExit(f"{where}: unknown setting {dotted!r}{_did_you_mean(cfg, dotted)}; valid here: {sorted(fields)}")
    hint = typing.get_type_hints(type(target), include_extras=True)[name]
    if raw:
        if _takes_string(hint, value):
            value = _string_items(hint, value)
        else:
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise SystemExit(f"{where}: {dotted}={value!r}: not readable as YAML ({getattr(e, 'problem', e)}); "
                                 "quote it, or write a list as [a, b]") from None
    try:
        setattr(target, name, _coerce(value, hint))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"{where}: {dotted}={value!r}: {e}") from None


def _did_you_mean(cfg, dotted: str) -> str:
    """ ' (did you mean layout.attention?)': a setting of that name elsewhere in the tree (attention=
    moved into layout), else a close spelling."""
    import difflib

    names = list(flat_dict(as_dict(cfg)))
    moved = [n for n in names if n.endswith("." + dotted.split(".")[-1])]
    close = moved or difflib.get_close_matches(dotted, names, n=2, cutoff=0.75)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _takes_string(hint, text: str) -> bool:
    """Whether a command-line `text` for a setting of type `hint` is a string as written: str fields
    (and str | None unless null), one item of a list of strings unless it is a YAML list."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return _takes_string(args[0], text)
    if hint is str:
        return True
    if origin in (typing.Union, types.UnionType):
        return str in args and text.strip() not in ("null", "~", "")
    if origin in (list, tuple) and args and args[0] is str:
        return not text.lstrip().startswith("[")
    return False


def _string_items(hint, text: str):
    """A command-line text for a string setting as written; for a list of strings, its comma-separated
    items (lora.targets=c_attn,c_proj is two module names)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return text if any(isinstance(a, Verbatim) for a in args[1:]) else _string_items(args[0], text)
    if origin in (list, tuple) and args and args[0] is str:
        return [item.strip() for item in text.split(",") if item.strip()]
    return text


def _coerce(value, hint):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        value = _coerce(value, args[0])
        for check in args[1:]:
            if value is not None and isinstance(check, Range):
                check.check(value)
            if isinstance(value, str) and isinstance(check, Escapes):
                value = unescape(value)
        return value
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):  # e.g. one phase of a list of phases
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping of {hint.__name__} settings, got {value!r}")
        made, hints = hint(), typing.get_type_hints(hint, include_extras=True)
        for key, item in value.items():
            if key not in hints:
                raise ValueError(f"unknown key {key!r} (valid: {sorted(hints)})")
            try:
                setattr(made, key, _coerce(item, hints[key]))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{key}={item!r}: {e}") from None
        return made
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"choose one of {', '.join(map(str, args))}")
        return value
    if value is None:
        if origin in (typing.Union, types.UnionType) and type(None) in args:
            return None
        raise ValueError(f"expected {_type_name(hint)}, not null")
    if origin in (typing.Union, types.UnionType):
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin in (tuple, list):
        if isinstance(value, (str, int, float)):  # one value where a list goes: lora.targets=q_proj
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, not {type(value).__name__}")
        if origin is tuple and (len(args) != 2 or args[1] is not Ellipsis):  # tuple[int, int]: fixed size
            if len(value) != len(args):
                raise ValueError(f"expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a) for v, a in zip(value, args))
        return origin(_coerce(v, args[0]) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError("expected true or false")
    if hint in (int, float):
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                hint is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected {'an integer' if hint is int else 'a finite number'}")
        return hint(value)
    if hint is str:
        return str(value)
    return value


def _type_name(hint) -> str:
    return getattr(hint, "__name__", str(hint))


def describe(cfg, prefix: str = "", explain: bool = False) -> str:
    """Every setting with its value (and its allowed values or range), for logs and errors;
    with explain, also what it does (the comment beside its field in the dataclass), for --help."""
    lines = []
    hints = typing.get_type_hints(type(cfg), include_extras=True)
    notes = _field_comments(type(cfg)) if explain else {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            lines.append(describe(v, prefix + f.name + ".", explain))
            continue
        allowed = _allowed(hints[f.name])
        line = f"  {prefix}{f.name} = {v!r}" + (f"   ({allowed})" if allowed else "")
        if notes.get(f.name):
            line = f"{line:<58} # {notes[f.name]}"
        lines.append(line)
    return "\n".join(lines)


def _field_comments(cls) -> dict[str, str]:
    """{field: the comment on its line} read from the dataclass's source (empty if unavailable)."""
    import inspect
    import re

    notes = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # RunConfig's, then the recipe's
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        found = re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", source, flags=re.M)
        notes.update({name: note.strip() for name, note in found})
    return notes


def _allowed(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return " | ".join(map(str, args))
    if origin is Annotated:
        ranges = [a for a in args[1:] if isinstance(a, Range)]
        return ", ".join(f"{'-inf' if r.low is None else r.low}..{'inf' if r.high is None else r.high}"
                         for r in ranges) or _allowed(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(filter(None, (_allowed(a) for a in args if a is not type(None))))
    return ""


def as_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def flat_dict(d: dict, prefix: str = "") -> dict:
    """{"sft": {"steps": 3}} -> {"sft.steps": 3}: settings as the command line names them."""
    out = {}
    for k, v in d.items():
        out.update(flat_dict(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


@dataclass
class Stage:
    """One training stage of a recipe (batch size per process)."""

    steps: PositiveInt = 1000       # optimizer steps
    batch_size: PositiveInt = 32    # examples (or packed rows) per process and step
    lr: NonNegativeFloat = 3e-3     # peak learning rate (cosine schedule, 5% warmup)


@dataclass
class Sampler:
    """How a round samples the model's own errors (recipes/self_correct.py, recipes/dpo.py)."""

    problems: PositiveInt = 4000       # SFT problems sampled per round (a new draw each round)
    k: PositiveInt = 4                 # samples per problem
    temperature: NonNegativeFloat = 0.8
    top_p: TopP = 0.95
    max_new_tokens: PositiveInt = 192
    correction_tries: NonNegativeInt = 4  # own resamples tried per error before the reference
    per_problem: PositiveInt = 1       # examples kept per problem and round


DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY_LLAMA_LINEAR = set(DEFAULT_TARGETS) | {"lm_head"}


@dataclass
class LoraSettings:
    """LoRA adapters + the BT rows (halluc.training.lora, which imports torch: these are read before it loads)."""

    enabled: bool = False     # SFT trains LoRA adapters + the BT rows instead of all weights
    r: PositiveInt = 16       # adapter rank
    alpha: PositiveInt = 32   # adapter scale numerator (scale = alpha / r)
    dropout: Fraction = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS  # module names that get adapters
    # False reproduces the origin project's bug (BT rows frozen): a negative control only.
    train_bt_rows: bool = True


@dataclass
class LayoutSettings:
    """How examples become training rows: what attends to what, the positions, the kernel, packing
    (docs/attention.md). Every layout rule is here (`check`)."""

    # Technique 4. causal: errors stay visible to what follows (Physics-of-LM "retry" data) and plain
    # generation is its exact inference twin; block_errors + rewound is the twin of KV-rewinding generation.
    attention: Literal["causal", "block_errors"] = "causal"  # block_errors: corrections cannot see errors
    positions: Literal["original", "rewound"] = "original"  # rewound: as a cropped KV cache numbers them
    backend: Literal["auto", "native", "dense", "dense_units", "flex", "varlen", "varlen_kv"] = "auto"  # docs/attention.md
    pack: NonNegativeInt = 0  # >0: pack examples into rows of this many tokens

    def check(self) -> None:
        if self.attention == "block_errors" and self.positions != "rewound":
            raise ValueError("layout.attention=block_errors needs layout.positions=rewound: that pair is the exact "
                             "twin of KV-rewinding generation; with original positions no decoder matches training")
        if self.attention == "causal" and self.positions == "rewound":
            raise ValueError("layout.positions=rewound changes nothing under layout.attention=causal (nothing is "
                             "erased, so the positions stay 0..L-1): set layout.attention=block_errors with it, or "
                             "drop it")
        if self.backend == "native" and (self.attention != "causal" or self.positions != "original" or self.pack):
            raise ValueError("layout.backend=native runs the model's own causal kernel: it needs layout.attention="
                             "causal, layout.positions=original and layout.pack=0 (backend=auto picks an edit-tree "
                             "backend otherwise)")


@dataclass(frozen=True)
class PreferenceKind:
    """A preference loss by name and what it needs (capabilities on the loss, as torchtune's rlhf
    losses carry them). The formulas are halluc.core.losses.preference_loss; the names live here, torch-free,
    so recipes check their settings with them before any ML library loads."""

    name: str
    reference: bool = True    # scored against a reference model (all but sft: the chosen side alone)
    token_kl: bool = False    # the reference's whole distribution at every token (TDPO): a live reference
    lengths: bool = False     # the completions' token counts (IPO's per-token means)


PREFERENCE_KINDS = {kind.name: kind for kind in (
    PreferenceKind("sigmoid"), PreferenceKind("ipo", lengths=True), PreferenceKind("tdpo1", token_kl=True),
    PreferenceKind("tdpo2", token_kl=True), PreferenceKind("sft", reference=False))}


def check_run_rules(cfg, model_paths: tuple[str, ...] = ("model",)) -> None:
    """The rules every recipe's settings share; each recipe's `check()` calls it first. Raises
    ValueError: resume together with overwrite, a model path (of the fields in `model_paths`) that is
    not there. (The layout's rules are LayoutSettings.check, which runs by itself.)"""
    from halluc.core.inputs import check_model_path, check_writable_folder

    if cfg.resume and cfg.overwrite:
        raise ValueError("resume=true and overwrite=true contradict each other: choose one")
    lora = getattr(cfg, "lora", None)
    if lora is not None and lora.enabled and "model" in model_paths and not getattr(cfg, "model", None):
        # the lab's model is the tiny Llama: its module names are known without building it
        missing = [t for t in lora.targets if t.split(".")[-1] not in TINY_LLAMA_LINEAR]
        if missing:
            raise ValueError(f"lora.targets: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not a "
                             f"module of the lab's tiny Llama (model= not set); its linear layers: "
                             f"{', '.join(DEFAULT_TARGETS)}")
    if getattr(cfg, "deepspeed", None):
        from halluc.core.inputs import check_input_file

        check_input_file(cfg.deepspeed, "deepspeed")
    check_writable_folder(cfg.output_dir, "output_dir")
    check_writable_folder(cfg.cache_dir, "cache_dir")
    for name in model_paths:
        if getattr(cfg, name):
            try:
                check_model_path(getattr(cfg, name))  # halluc.core.inputs
            except FileNotFoundError as e:
                raise ValueError(f"{name}={getattr(cfg, name)}: {e}") from None
    if "model" in model_paths and getattr(cfg, "model", None) and hasattr(cfg, "lab"):
        check_task_of_checkpoint(cfg.model, cfg.lab)


def check_task_of_checkpoint(model: str, lab) -> None:
    """A halluc checkpoint records the lab it was trained on (config.json: halluc.lab): a run from it
    evaluates on that task, so a lab.task that differs is refused at load (it evaluated the built-in
    arith task on a GSM8K checkpoint, silently)."""
    config, adapter = Path(model) / "config.json", Path(model) / "halluc_adapter.json"  # an adapter's record
    source = config if config.is_file() else adapter
    if not source.is_file():
        return
    try:
        trained = (json.loads(source.read_text()).get("halluc") or {}).get("lab") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return
    task = trained.get("task")
    if task and task != lab.task:
        hint = " ".join(f"lab.{k}={trained[k]}" for k in ("test_file", "train_file") if trained.get(k))
        raise ValueError(f"model={model} was trained on lab.task={task} (its config.json records it), but this run "
                         f"would evaluate it on lab.task={lab.task}: set lab.task={task}"
                         + (f" (it was trained with {hint})" if hint else "") + " and the test file to evaluate on")


HEAD_WEIGHTS = "verifier_head.safetensors"  # a saved verifier head (halluc.objectives.verifier_head, which imports torch)


def has_head(folder) -> bool:
    """Whether `folder` holds a verifier head: recipes check it with their settings."""
    return (Path(folder) / HEAD_WEIGHTS).exists()
