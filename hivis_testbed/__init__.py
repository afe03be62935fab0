"""The testbed of vllm-hivis, apart from the product: a procedural tiny world (``tinyworld``), the
small LLaVA target and hivis drafter trained on it and shipped with the repo (``assets``), the
demo (``demo``) and a ``vllm serve`` child-process helper (``server``). Nothing in ``vllm_hivis``
imports it, except the training pipeline's optional ``--tinyworld`` prompt source.
"""
