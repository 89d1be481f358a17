"""fastattn behind other libraries' extension points; each submodule imports its library (optional
dependencies), so ``import fastattn`` imports none of them.

- ``fastattn.integrations.transformers``: ``attn_implementation="fastattn_bigbird"`` and friends.
"""
