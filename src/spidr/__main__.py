"""``python -m spidr``: the command-line interface."""

from spidr.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
