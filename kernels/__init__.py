"""Triton kernels for attention over a paged KV cache, each beside its torch reference.

- ``write_kv_cache``: store new tokens' K/V at their slots.
- ``paged_decode_attention``: one query per sequence, split across long contexts; graph-capturable.
- ``plan_shared_prefix`` / ``shared_prefix_decode_attention``: decode that reads each prefix shared
  by a group of sequences once (several groups, nested), and ``choose_decode_kernel`` to pick it.
- ``paged_prefill_attention``: chunked prefill of packed sequences over their cached prefixes.

The references (``kernels.reference``) are the specification and the CPU attention path.
Imports nothing of ours.
"""

from importlib import import_module

# Triton is imported on first use of a kernel, so the references work where Triton is not installed.
_HOMES = {
    "write_kv_cache": "kv_cache",
    "paged_decode_attention": "paged_decode",
    "paged_prefill_attention": "prefill",
    "PrefixGroup": "shared_prefix",
    "SharedPrefixLaunch": "shared_prefix",
    "SharedPrefixPlan": "shared_prefix",
    "choose_decode_kernel": "shared_prefix",
    "decode_cost": "shared_prefix",
    "plan_shared_prefix": "shared_prefix",
    "shared_prefix_decode_attention": "shared_prefix",
    "reference_write_kv_cache": "reference",
    "reference_paged_decode_attention": "reference",
    "reference_shared_prefix_decode_attention": "reference",
    "reference_paged_prefill_attention": "reference",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_HOMES[name]}", __name__), name)
