"""`trl-ica` command line: `trl-ica demo [...]`."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="trl-ica", description="ICA data weighting for TRL.")
    commands = parser.add_subparsers(dest="command", required=True)
    from . import demo

    demo.make_parser(commands.add_parser("demo", help="Noisy-GSM8K LoRA demo on SmolLM2-135M-Instruct (CPU)."))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "demo":
        demo.quiet()
        demo.run(args)


if __name__ == "__main__":
    main()
