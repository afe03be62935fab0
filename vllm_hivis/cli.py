"""``vllm-hivis`` command line: assets, the demo, and the tiny-world / drafter pipelines.

    vllm-hivis assets                 print the shipped model directories as JSON
    vllm-hivis demo                   serve the tiny target with hivis and query it (README main job)
    vllm-hivis train-target ...       train the tiny-world target LLaVA (tinyworld/train_target.py)
    vllm-hivis eval-target DIR ...    grade a target on held-out scenes (tinyworld/evaluate.py)
    vllm-hivis generate-data ...      target answers + hidden states for drafter training (Ray Data)
    vllm-hivis train ...              train a drafter: hivis recipe or a baseline (Ray Train)
    vllm-hivis evaluate ...           offline acceptance replay of a drafter (plain torch)
"""

from __future__ import annotations

import json
import sys


def _assets(argv):
    from . import assets

    print(json.dumps(assets.all_assets(), indent=2))
    return 0


def _demo(argv):
    from .demo import main

    return main(argv)


def _train_target(argv):
    from .tinyworld.train_target import main

    return main(argv)


def _eval_target(argv):
    from .tinyworld.evaluate import main

    return main(argv)


def _generate(argv):
    from .train.generate import main

    return main(argv)


def _train(argv):
    from .train.trainer import main

    return main(argv)


def _evaluate(argv):
    from .train.evaluate import main

    return main(argv)


COMMANDS = {"assets": _assets, "demo": _demo, "train-target": _train_target, "eval-target": _eval_target,
            "generate-data": _generate, "train": _train, "evaluate": _evaluate}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}; expected one of {sorted(COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    return COMMANDS[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
