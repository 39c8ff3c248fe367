"""Generation: sampling settings, the sampler and batched decoding of rows at different positions
(``sampling``) through a network's KV cache (``kv_cache``).

``kv_cache`` is plain torch on the ground floor (the networks write it in their forward); ``sampling``
may import the ground floor, lm.text and lm.models; nothing of training, the stages, serving or tracking.
"""
