"""Core `lease` commands: train, train-condgen, class-embeddings, import-reference, export, convert-checkpoint.

`register(subparsers)` adds them to a parser; the `lease` console entry (pipeline/cli.py) composes these
with the pipeline stages. `python -m lease.cli ...` runs the core commands alone.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import get_args

from lease import clip_text, condgen, train
from lease.cli_help import show_defaults
from lease.configs import ContrastPlacement


def _import_reference(args: argparse.Namespace) -> int:
    from lease.checkpoints import describe_import, import_reference, save_reference_import

    if args.method == "lease" and args.codebook is None:
        raise SystemExit("lease import-reference: --method lease needs --codebook (the centroids the checkpoint "
                         "was trained with)")
    model, report = import_reference(args.checkpoint, args.codebook, method=args.method, vocab_gen=args.vocab_gen,
                                     num_heads=args.num_heads, decoder_num_heads=args.decoder_num_heads,
                                     cls_token_id=args.cls_token_id, mask_token_id=args.mask_token_id,
                                     contrast_on=args.contrast_on)
    path = save_reference_import(model, args.out, str(args.checkpoint))
    logging.getLogger("lease").info("saved %s\n%s", path, describe_import(report))
    return 0


def _export(args: argparse.Namespace) -> int:
    from lease.checkpoints import export_encoder, model_from_checkpoint

    path = export_encoder(model_from_checkpoint(args.checkpoint), args.out)
    logging.getLogger("lease").info("exported encoder to %s", path)
    return 0


def _convert_checkpoint(args: argparse.Namespace) -> int:
    from lease.checkpoints import convert_checkpoint

    convert_checkpoint(args.checkpoint, args.out, trust_checkpoint=args.trust_checkpoint)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the core commands to a parser's sub-commands."""
    p = subparsers.add_parser("train", help="pretrain LEASE on packed token shards")
    train.add_arguments(p)
    p.set_defaults(func=train.run_cli)

    p = subparsers.add_parser("train-condgen", help="fine-tune the class-conditional decoder on the frozen encoder "
                              "(paper §4.4; torchrun -m lease.condgen for several GPUs)")
    condgen.add_arguments(p)
    p.set_defaults(func=condgen.run_cli)

    p = subparsers.add_parser("class-embeddings", help="CLIP text features of one prompt per class name (.npy)")
    clip_text.add_arguments(p)
    p.set_defaults(func=clip_text.run_cli)

    p = subparsers.add_parser("import-reference", help="convert an authors' LEASE, Sorcen or MAGE checkpoint to ours")
    p.add_argument("checkpoint", type=Path, help="reference state dict (raw, {'model': ...}, module. prefixes ok)")
    p.add_argument("--method", default="lease", choices=["lease", "sorcen", "mage"],
                   help="the checkpoint's layout: the authors' LEASE, their Sorcen ViT release, or LTH14/mage's "
                        "pretraining (Sorcen's keys without teacher, projector and predictor)")
    p.add_argument("--codebook", type=Path, default=None, help="centroids .npy float32 [K, D] (--method lease)")
    p.add_argument("--out", type=Path, required=True, help="our checkpoint file to write")
    p.add_argument("--vocab-gen", type=int, default=1024, help="number of VQGAN codes (V_gen)")
    p.add_argument("--num-heads", type=int, default=None, help="encoder heads (default: from the width's preset)")
    p.add_argument("--decoder-num-heads", type=int, default=None)
    p.add_argument("--cls-token-id", type=int, default=None,
                   help="default: vocabulary size - 2 (lease), 1100 (sorcen, mage: their layout)")
    p.add_argument("--mask-token-id", type=int, default=None, help="default: vocabulary size - 1")
    p.add_argument("--contrast-on", default="encoder", choices=list(get_args(ContrastPlacement)))
    p.set_defaults(func=_import_reference)

    p = subparsers.add_parser("export", help="export encoder weights (safetensors + config JSON)")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_export)

    p = subparsers.add_parser("convert-checkpoint", help="rewrite a torch file that needs full unpickling as "
                              "one that loads weights-only (tensors and plain data kept)")
    p.add_argument("checkpoint", type=Path, help="torch file the loaders refuse (e.g. an old Lightning .ckpt)")
    p.add_argument("out", type=Path, help="weights-only loadable file to write")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="required: reading CHECKPOINT runs any code it names, so only for files you trust")
    p.set_defaults(func=_convert_checkpoint)



def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="lease")
    register(parser.add_subparsers(dest="command", required=True))
    args = show_defaults(parser).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
