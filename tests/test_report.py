"""The summary `make pipeline` prints shows each figure with its uncertainty."""

from __future__ import annotations

import json

from pipeline.report import summary_lines


def test_each_figure_shows_its_standard_error_or_interval_where_the_file_has_one(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/evaluate.json").write_text(json.dumps({
        "test": {"bpb": 1.5, "bpb_se": 0.01, "bigram_bpb": 1.8},
        "next_sentence": {"acc_pmi": 0.5, "acc_pmi_lo": 0.45, "acc_pmi_hi": 0.55},
    }))
    line = next(line for line in summary_lines(tmp_path) if "evaluate.json" in line)
    assert line == ("  metrics/evaluate.json: test.bpb 1.5 ± 0.01, test.bigram_bpb 1.8, "
                    "next_sentence.acc_pmi 0.5 [0.45, 0.55]")
