"""``effsr convert``: an official checkpoint into an effsr checkpoint."""

from __future__ import annotations

import argparse


def convert_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="effsr convert",
                                     description="Convert an official checkpoint into an effsr checkpoint.")
    parser.add_argument("--method", choices=["smsr"], required=True)
    parser.add_argument("--scale", type=int, required=True, choices=[2, 3, 4])
    parser.add_argument("source", help="official checkpoint (a state_dict; loaded with weights_only=True)")
    parser.add_argument("target", help="effsr checkpoint to write (use with `effsr test --ckpt_path`)")
    args = parser.parse_args(argv)
    from effsr.methods.smsr import convert_official_checkpoint

    convert_official_checkpoint(args.source, args.target, args.scale)
    print(f"wrote {args.target}")
    return 0
