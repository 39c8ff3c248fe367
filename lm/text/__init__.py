"""Text as tokens: the tokenizer primitives (train, load, special ids), chat templates, the token
shards and the tokenize stage that writes them.

May import lm.config, lm.errors, lm.fileio, lm.memory, lm.pipeline.stage, lm.data and lm.models.source (what
a base model brings); nothing of training, generation, serving or the registry.
"""
