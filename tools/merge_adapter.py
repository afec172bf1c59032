"""Merge a LoRA adapter saved by a recipe into its base: a standalone HF checkpoint.

    python tools/merge_adapter.py --adapter runs/masked_sft/adapter --out runs/masked_sft/merged
    python tools/merge_adapter.py --base path/to/base --adapter runs/x/adapter --out runs/x/merged

--base defaults to the base path the recipe recorded in the adapter folder. The base is the
ORIGINAL model (without the BT token): it is checked against the adapter (architecture, sizes,
vocabulary, a fingerprint of its weights) and refused with the differences named, then
resized to the adapter's tokenizer; LoRA and the trained BT rows are merged in. The output
(model + tokenizer with the BT token + config.halluc) loads with plain
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from halluc.core.inputs import check_model_path, check_out_folder, check_reads_outside, replace_folder, run_cli

log = logging.getLogger("merge_adapter")
DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="adapter folder written by a recipe (OUT/adapter)")
    p.add_argument("--base", default=None, help="base model folder (default: the path recorded in the adapter)")
    p.add_argument("--out", required=True, help="folder for the merged checkpoint (refused if it holds anything)")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the saved weights")
    args = p.parse_args(argv)
    check_reads_outside(args.out, {"--adapter": args.adapter, "--base": args.base})
    # local paths first: a missing base would otherwise send HF to the hub, retrying for a minute
    if not Path(args.adapter).is_dir():
        raise SystemExit(f"--adapter {args.adapter}: no such folder" if not Path(args.adapter).exists()
                         else f"--adapter {args.adapter} is a file: give the adapter folder")
    if args.base:
        try:
            check_model_path(args.base, "--base")
        except FileNotFoundError as e:
            raise SystemExit(str(e)) from None
    check_out_folder(args.out, args.overwrite)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # The ML libraries load here, after the arguments were checked.
    import torch

    from halluc.training.lora import BaseMismatch, merge_adapter, read_adapter_info
    from halluc.core.tokens import backtrack_id

    try:
        info = read_adapter_info(args.adapter)
        base = args.base or info.get("base_path")
        if not args.base:
            check_model_path(base, f"the base recorded in {args.adapter} (give --base)")
            check_reads_outside(args.out, {"the base recorded in the adapter,": base})
        log.info("merging %s into %s", args.adapter, base)
        # merge in float32 (LoRA's low-rank product added to bf16 weights would round twice)
        model, tokenizer = merge_adapter(args.adapter, args.base, dtype=torch.float32)
    except (BaseMismatch, FileNotFoundError, OSError, ValueError) as e:
        raise SystemExit(f"merge_adapter: refused: {e}") from None
    out = replace_folder(args.out)
    model.to(getattr(torch, args.dtype)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    bt = backtrack_id(tokenizer)
    log.info("wrote %s: %s, vocabulary %d, BT id %d", out, type(model).__name__,
             model.get_input_embeddings().weight.shape[0], bt)
    return out


if __name__ == "__main__":
    run_cli(main)
