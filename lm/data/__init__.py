"""The data stage: ingest -> clean (filters, dedup, split) -> tokenize -> shard.

``lm.data.ingest.ingest``, ``lm.data.clean.clean``, ``lm.text.tokenize.tokenize`` and
``lm.data.labelled.build_finetune_data`` are the stage functions; each writes into ``out_dir``
and returns an ``lm.pipeline.stage.StageResult``.
"""

# Columns of the documents parts (documents/part-*.parquet), train.parquet and val.parquet.
DOCUMENT_COLUMNS = ("doc_id", "source", "text")
