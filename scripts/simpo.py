"""ICA-weighted SimPO with TRL's script conventions (TrlParser: script, training and model arguments; --config YAML).

accelerate launch --config_file recipes/accelerate/single_gpu.yaml scripts/simpo.py --config recipes/simpo_lora.yaml
"""

import sys

from trl_ica.cli.launch import main

if __name__ == "__main__":
    main(["simpo", *sys.argv[1:]])
