"""Conversion of released records (parquet, JSONL) into webdataset shards (``muco data convert``).

- :mod:`muco.convert.pipeline`: the pipeline every record kind shares (pool, ordered writer, rejects, manifest);
- :mod:`muco.convert.sources`: parquet and JSONL input items;
- :mod:`muco.convert.images`: image loading and re-encoding;
- :mod:`muco.convert.limits`: the text length limits;
- :mod:`muco.convert.m3t` and :mod:`muco.convert.pairs`: the record kinds (pretraining records, fine-tuning pairs).
"""
