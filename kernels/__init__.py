"""Triton kernels of vllm-hivis (imported as ``vllm_hivis.kernels``).

- ``tree_attention``: paged-KV attention of a batch of token trees (or chains / prefill chunks)
  over their committed prefix; ``tree_attention`` (kernel) and ``tree_attention_ref`` (torch).
- ``tree_verify``: greedy acceptance of a draft tree (``tree_verify`` / ``tree_verify_ref``) and
  in-place compaction of the accepted path's KV into a chain (``accepted_path_slots``,
  ``compact_kv`` / ``compact_kv_ref``).

The submodules import triton, so this package does not import them eagerly: import
``vllm_hivis.kernels.tree_attention`` etc. explicitly. On CPU the kernels run only under the
Triton interpreter (``TRITON_INTERPRET=1`` set before triton is first imported).
"""

__all__ = ["tree_attention", "tree_verify"]
