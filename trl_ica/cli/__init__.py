"""The `trl-ica` command line: its commands, the TRL-style training scripts, the demo and the offline data assets."""

from .main import main

__all__ = ["main"]
