"""Adapters that plug flash_softmax's attention into other libraries.

Each submodule imports its library lazily, so ``import flash_softmax`` never needs them:

- ``flash_softmax.integrations.transformers``: ``register()`` adds ``attn_implementation="fs_attention"``
  to Hugging Face transformers.
"""
