"""Documents: the ingest and clean stages (``ingest``, ``sources``; ``clean`` with ``filters``, ``dedup``,
``writing_systems``, ``batching``) and the fine-tuning data they feed (``labelled``, ``instruct``, ``pydefs``;
a user's records in any container, ``records``, and the instruction formats read into conversations,
``conversations``).

May import the ground floor only (lm.config, errors, fileio, hashing, memory, pipeline.stage) and
lm.text for the fine-tuning data's chat format; never networks, training, generation, serving or tracking.
"""

# Columns of the documents parts (documents/part-*.parquet), train.parquet and val.parquet.
DOCUMENT_COLUMNS = ("doc_id", "source", "text")
