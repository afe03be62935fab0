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

import importlib
import json
import sys

# command -> module whose main(argv) runs it (imported lazily: `vllm-hivis assets` stays instant)
COMMANDS = {
    "demo": "vllm_hivis.demo",
    "train-target": "vllm_hivis.tinyworld.train_target",
    "eval-target": "vllm_hivis.tinyworld.evaluate",
    "generate-data": "vllm_hivis.train.generate",
    "train": "vllm_hivis.train.trainer",
    "evaluate": "vllm_hivis.train.evaluate",
}


def _assets() -> int:
    from . import assets

    print(json.dumps(assets.all_assets(), indent=2))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv[0] == "assets":
        return _assets()
    if argv[0] not in COMMANDS:
        print(__doc__.strip())
        print(f"\nunknown command {argv[0]!r}; expected one of {['assets', *COMMANDS]}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
