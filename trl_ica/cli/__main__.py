"""`python -m trl_ica.cli ...`, the same as the `trl-ica` command."""

from .main import main

main()
