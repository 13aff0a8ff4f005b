"""Run a scenario: ``python experiments/run.py --scenario cold-start`` (same as ``agorasim run``)."""

import sys

from agorasim.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
