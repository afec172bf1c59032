"""Every user-facing input, checked before any model loads, and how a failure reaches the user.

A failure is one line naming the setting, the file (line, field) and what to do; a command exits
with code 2 and no traceback (`--debug` shows it: `run_cli`). The checks read files and folders
only (torch-free), except `check_lora_targets`, which builds the model's skeleton on the meta
device (no weights) to list its module names.

    model folders      check_model_path   exists, a folder with config.json (not config.json itself)
    input files        check_input_file   exists, a file (not a folder), readable
    output folders     check_writable_folder (recipes' output_dir, cache_dir), check_out_folder (tools' --out)
    LoRA targets       check_lora_targets every target names modules of the model
    file contents      InputError         raised by the readers (halluc.tasks, halluc.objectives.prm, ...)
"""
from __future__ import annotations

import os
import sys
import tempfile
import traceback
from pathlib import Path


class InputError(ValueError):
    """A user's input is wrong (a file's line, a missing field): shown as one line, exit code 2."""


def check_input_file(path: str, setting: str) -> None:
    """A file the user named must be there, be a file and be readable."""
    p = Path(path).expanduser()
    if not p.exists():
        near = sorted(x.name for x in p.parent.iterdir())[:8] if p.parent.is_dir() else None
        raise InputError(f"{setting}={path}: no such file" + (f" (in {p.parent}: {near})" if near else
                                                              f" (no folder {p.parent})"))
    if p.is_dir():
        raise InputError(f"{setting}={path}: a folder, not a file (give the .jsonl file inside it)")
    if not os.access(p, os.R_OK):
        raise InputError(f"{setting}={path}: not readable (permissions)")


def check_writable_folder(path: str, setting: str = "output_dir") -> None:
    """A folder a run writes into: it, or the nearest folder above it that exists, must be writable."""
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise InputError(f"{setting}={path}: a file, not a folder")
    existing = next(q for q in (p, *p.parents) if q.exists())
    if not existing.is_dir():
        raise InputError(f"{setting}={path}: {existing} is a file, not a folder")
    try:  # a probe, not os.access: root passes os.access on a read-only mount
        fd, probe = tempfile.mkstemp(prefix=".halluc-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"{setting}={path}: cannot write in {existing} ({e.strerror}): choose another folder") from None


def check_out_folder(path: str, overwrite: bool, flag: str = "--out") -> None:
    """A tool's output folder, checked before any work: refused when it holds anything (a run may have
    trained on it) unless `overwrite`; then `replace_folder` empties it when the tool writes."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise SystemExit(f"{flag} {path}: a file, not a folder")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise SystemExit(f"{flag} {path} already holds {', '.join(sorted(x.name for x in p.iterdir())[:6])}: "
                         "pass --overwrite to replace it, or choose another folder")
    check_writable_folder(path, flag)


def check_reads_outside(out: str, reads: dict[str, str | None],
                        refusal: str = "--out {out} holds {name} {source}, which this run reads: choose another --out"
                        ) -> None:
    """Replacing `out` (--overwrite, overwrite=true) deletes what it holds: refuse (`refusal`, formatted
    with out, name, source) when something the run reads (`reads`: {its name: its path}) lies inside it."""
    inside = Path(out).resolve()
    for name, source in reads.items():
        if source and Path(source).resolve().is_relative_to(inside):
            raise SystemExit(refusal.format(out=out, name=name, source=source))


def replace_folder(path: str) -> Path:
    """An empty folder at `path` (what was there is removed: check_out_folder allowed it)."""
    import shutil

    p = Path(path)
    if p.exists():
        shutil.rmtree(p)
    p.mkdir(parents=True)
    return p


def check_model_path(path: str, what: str = "model") -> None:
    """Fail at once, naming the path, when a local model folder is missing (instead of HF retrying
    the hub for a minute or complaining about repo ids). `org/name` is left to the hub unless its
    first part is a local folder (then `models/llama3` is a typo) or HF_HUB_OFFLINE=1."""
    p = Path(path).expanduser()
    if p.is_file():
        raise FileNotFoundError(f"{what} {path} is a file: give the folder that holds it ({p.parent})"
                                if p.name == "config.json" else f"{what} {path} is a file, not a model folder")
    if p.exists():
        if p.is_dir() and not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
            raise FileNotFoundError(f"{what} folder {path} has no config.json: not a saved model "
                                    f"(found: {sorted(x.name for x in p.iterdir())[:12]})")
        return
    text = str(path)
    local = text.startswith((".", "/", "~")) or text.count("/") != 1 or Path(text.split("/")[0]).is_dir()
    if local:
        raise FileNotFoundError(f"{what} {path}: no such folder")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"{what} {path}: no such folder, and HF_HUB_OFFLINE=1 forbids the hub")


def check_lora_targets(model_dir: str, targets, setting: str = "lora.targets") -> None:
    """Every LoRA target must name modules of the model (PEFT matches a name or its last parts):
    checked on the model's skeleton (meta device, no weights) before the model loads."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = [n for n, m in skeleton.named_modules() if isinstance(m, (torch.nn.Linear,)) or
             type(m).__name__ in ("Conv1D", "Embedding")]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.split(".")[-1] for n in names if not n.endswith(("lm_head", "embed_tokens", "wte", "wpe"))})
        raise InputError(f"{setting}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not a module of "
                         f"{model_dir} ({config.model_type}); its linear layers: {', '.join(leaves)} "
                         f"(e.g. {setting}={','.join(leaves[:2])})")


def run_cli(main) -> None:
    """The entry of every recipe and tool (`if __name__ == "__main__": run_cli(main)`): a user's error
    (a SystemExit with a message, InputError, a file or folder that is missing, unreadable or not
    writable) is one line on stderr and exit code 2; `--debug` anywhere on the command line shows the
    traceback instead. A returned int is the exit code."""
    debug = "--debug" in sys.argv
    sys.argv = [a for a in sys.argv if a != "--debug"]
    try:
        code = main()
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        if debug:
            traceback.print_exc()
        print(f"error: {e.code}", file=sys.stderr)
        raise SystemExit(2) from None
    except (InputError, OSError) as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}" + ("" if debug else "  (--debug shows where)"), file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code if isinstance(code, int) else 0)
