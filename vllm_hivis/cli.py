"""``vllm-hivis`` command line: make a hivis drafter for your own VLM.

    vllm-hivis generate-data ...      target answers + hidden states for drafter training (Ray Data)
    vllm-hivis train ...              train a drafter: hivis recipe or a baseline (Ray Train)
    vllm-hivis evaluate ...           offline acceptance replay of a drafter (plain torch)

Serving needs no command of its own: ``vllm serve <target> --speculative-config
'{"method": "hivis", "model": "<drafter dir>", "num_speculative_tokens": 5}'``. The tiny-world
testbed (demo, tiny target, shipped models) has its own command, ``hivis-testbed``.
"""

from __future__ import annotations

import importlib
import sys

# command -> module whose main(argv) runs it (imported lazily: `--help` stays instant)
COMMANDS = {
    "generate-data": "vllm_hivis.train.generate",
    "train": "vllm_hivis.train.trainer",
    "evaluate": "vllm_hivis.train.evaluate",
}


def dispatch(doc: str, commands: dict[str, str], argv: list[str]) -> int:
    """Run ``commands[argv[0]]``'s ``main(argv[1:])``; usage on no command, exit code 2 on a wrong one."""
    if not argv or argv[0] in ("-h", "--help"):
        print(doc.strip())
        return 0
    if argv[0] not in commands:
        print(doc.strip())
        print(f"\nunknown command {argv[0]!r}; expected one of {list(commands)}", file=sys.stderr)
        return 2
    return importlib.import_module(commands[argv[0]]).main(argv[1:]) or 0


def main(argv=None) -> int:
    return dispatch(__doc__, COMMANDS, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
