"""``hivis-testbed`` (or ``python -m hivis_testbed``): the tiny world this repo tests and demos on.

    hivis-testbed demo                   serve the tiny target with hivis and query it (README main job)
    hivis-testbed assets                 print the shipped model directories as JSON
    hivis-testbed train-target ...       train the tiny-world target LLaVA (tinyworld/train_target.py)
    hivis-testbed eval-target DIR ...    grade a target on held-out scenes (tinyworld/evaluate.py)
"""

from __future__ import annotations

import sys

from vllm_hivis.cli import dispatch

COMMANDS = {
    "demo": "hivis_testbed.demo",
    "assets": "hivis_testbed.assets",
    "train-target": "hivis_testbed.tinyworld.train_target",
    "eval-target": "hivis_testbed.tinyworld.evaluate",
}


def main(argv=None) -> int:
    return dispatch(__doc__, COMMANDS, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
