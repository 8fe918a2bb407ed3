"""``python -m spidr.train CONFIG [--set ...]``: the official entry point, same as ``spidr train`` (works under
torchrun)."""

import sys

from spidr.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
