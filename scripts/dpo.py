"""ICA-weighted DPO with TRL's script conventions (TrlParser: script, training and model arguments; --config YAML).

accelerate launch --config_file recipes/accelerate/single_gpu.yaml scripts/dpo.py --config recipes/dpo_lora.yaml
"""

import sys

from trl_ica.cli.launch import main

if __name__ == "__main__":
    main(["dpo", *sys.argv[1:]])
