"""vllm-hivis: HiViS speculative decoding for vision-language models, as a vLLM plugin.

The drafter never sees image tokens: it runs over the text tokens only and receives the visual
information through the target's last-layer hidden states. See README.md.

Importing this package is cheap and never imports vLLM; ``vllm_hivis.plugin.register`` (the
``vllm.general_plugins`` entry point) is what wires it into vLLM.
"""

__version__ = "0.1.0"
