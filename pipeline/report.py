"""Print a short summary after `make pipeline`: headline metrics and where outputs are."""

from __future__ import annotations

import json
from pathlib import Path

HEADLINES = {
    "metrics/tokenize.json": ("train.tokens", "val.tokens"),
    "metrics/vocab.json": ("kind", "vocab_size", "val_bytes_per_token"),
    "metrics/pretrain.json": ("val_bpb", "val_loss", "best_step", "tokens_seen"),
    "metrics/pretrain_speed.json": ("tokens_per_second", "wall_seconds", "device"),
    "metrics/evaluate.json": ("test.bpb", "test.bigram_bpb", "test.unigram_bpb", "test.ppl",
                              "test.acc", "next_sentence.acc_pmi",
                              "next_sentence.bigram_acc_pmi"),
    "metrics/reward.json": ("gpt.heldout_accuracy", "baseline.heldout_accuracy"),
    "metrics/sft.json": ("source", "heldout_loss_before", "heldout_loss_after"),
    "metrics/rlhf.json": ("algo", "reward", "gold_pretrained", "gold_after", "win_rate",
                          "val_bpb_change_pct"),
}


def _lookup(data: dict, dotted: str):
    if dotted in data:  # flat keys such as "test.bpb"
        return data[dotted]
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def main(root: Path = Path(".")) -> None:
    print("\ngptpipe: pipeline complete")
    for name, keys in HEADLINES.items():
        path = root / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        shown = ", ".join(f"{k} {_lookup(data, k)}" for k in keys if _lookup(data, k) is not None)
        print(f"  {name}: {shown}")
    print("  metrics:  metrics/*.json        (dvc metrics show)")
    print("  plots:    dvclive/pretrain/, dvclive/rlhf/  (dvc plots show, then open "
          "dvc_plots/index.html)")
    print("  models:   models/pretrain/best  (model.safetensors, gptpipe.json, tokenizer.json);"
          " fine-tuned: models/sft; RLHF-tuned: models/rlhf/best")
    print("  Transformers: models/hf/pretrain, models/hf/rlhf  "
          "(AutoModelForCausalLM.from_pretrained)")
    print("  samples:  evaluation/samples.json, evaluation/samples_rlhf.json")
    print("sample from the model:")
    print("  .venv/bin/gptpipe generate --model models/pretrain/best \"The river\"")


if __name__ == "__main__":
    main()
