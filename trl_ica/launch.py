"""`python -m trl_ica.launch sft|dpo|simpo ...`, the module that `accelerate launch -m` runs: the training scripts of
[`trl_ica.cli.launch`]."""

from .cli.launch import main

if __name__ == "__main__":
    main()
