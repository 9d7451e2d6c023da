"""Reading a document table holds memory bounded by one batch, not by the file."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.doctable import PART_NAME, iter_texts


def test_reading_a_table_batch_by_batch_keeps_no_row_group_already_read(tmp_path):
    # 12 MB of text that does not compress, in 20 row groups of 0.6 MB each. Arrow's
    # default prefetch kept each group's columns until the file closed (13.8 MB here).
    rng = random.Random(0)
    texts = [rng.randbytes(3000).hex() for _ in range(2000)]
    pq.write_table(pa.table({"text": texts}), tmp_path / PART_NAME, row_group_size=100)
    start, peak, read = pa.total_allocated_bytes(), 0, 0
    for batch in iter_texts(tmp_path, batch_size=100):
        read += len(batch)
        peak = max(peak, pa.total_allocated_bytes() - start)
    assert read == 2000
    assert peak < 4_000_000, f"{peak / 1e6:.1f} MB held while reading 12 MB batch by batch"
