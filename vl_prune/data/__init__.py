"""Readers of the data formats that pre-trained VL models were released with, shared by task
plugins: UNITER's txt_db and img_db (LMDB), per-image region feature files, and the loader that
collates batches in worker processes."""
