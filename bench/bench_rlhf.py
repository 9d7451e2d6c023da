"""Every RL algorithm with every builtin reward, on the default pipeline, at one budget.

Runs the ``rlhf`` stage's command once per (algorithm, reward) on the outputs of the
default pipeline in a repository (``dvc repro sft`` done: models/pretrain/best,
models/sft, models/reward, data/preferences, data/tokens), each with the default
params but ``rlhf.algo``, ``rlhf.reward`` and the learning rate of its kind of update,
into a scratch folder, and prints a Markdown table: gold score before (the SFT policy)
and after, the reward-model score after, the win rate against the pretrained model, the
KL to the reference, the change in val bits per byte against the pretrained model, the
wall time, and one sample of the best policy (the first held-out prompt, temperature
0.7, a fixed seed). DPO uses the preference pairs, not a reward: one row. Rows whose run
stops with an error (a KL above the ceiling, say) say so.

Usage: python bench/bench_rlhf.py REPO [--out table.md] [--rows ppo:model,grpo:gold ...]
Run it alone on the machine: the wall times are part of the table. The smallest run: a
REPO of the tiny params (``tests/tiny_params.yaml``) and ``--rows ppo:model,dpo:pairs``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import BIN, publish

from pipeline.core.io import parse_json, read_json

ALGOS = ("ppo", "grpo", "rloo", "reinforce", "dpo")
REWARDS = ("model", "gold", "likelihood")
# One optimizer step per batch (reinforce, rloo, dpo) needs a larger rate than several
# (ppo and grpo: ppo_epochs x batch_size / minibatch_size = 8 steps per batch).
LEARNING_RATES = {"ppo": 1e-5, "grpo": 1e-5, "rloo": 1e-4, "reinforce": 1e-4, "dpo": 1e-4}


def _rows(spec: str) -> list[tuple[str, str]]:
    if spec:
        return [tuple(item.split(":", 1)) for item in spec.split(",")]  # type: ignore[misc]
    rows = [(algo, reward) for algo in ALGOS if algo != "dpo" for reward in REWARDS]
    return [*rows, ("dpo", "pairs")]


def _sample(model: Path, prompt: str) -> str:
    from pipeline.lm.checkpoint import load_model, open_model_folder
    from pipeline.lm.sampling import SamplingConfig, sample_text

    _, _, tokenizer = open_model_folder(model)
    network, _ = load_model(model)
    config = SamplingConfig(temperature=0.7, max_new_tokens=40)
    return sample_text(network, tokenizer, prompt, config, seed=0)


def run_one(repo: Path, work: Path, algo: str, reward: str) -> dict:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["rlhf"]["algo"] = algo
    params["rlhf"]["lr"] = LEARNING_RATES[algo]
    if algo != "dpo":
        params["rlhf"]["reward"] = reward
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    command = [str(BIN / "gptpipe"), "rlhf", "--params", str(work / "params.yaml"),
               "--model", "models/sft", "--pretrained", "models/pretrain/best",
               "--reward", "models/reward", "--pairs", "data/preferences",
               "--tokens", "data/tokens", "--out", str(work / "out"),
               "--checkpoint", str(work / "ckpt"), "--live", str(work / "live"),
               "--metrics", str(work / "metrics.json")]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    started = time.monotonic()
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    row = {"algo": algo, "reward": reward, "lr": LEARNING_RATES[algo],
           "seconds": round(seconds, 1)}
    if result.returncode:
        row["error"] = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
        return row
    # The row's own keys win: the metrics' "reward" is the params' (DPO's row is "pairs").
    row = {**read_json(work / "metrics.json"), **row}
    heldout = (repo / "data/preferences/heldout.jsonl").read_text().splitlines()
    prompt = parse_json(heldout[0], "heldout.jsonl")["prompt"]
    row["prompt"] = prompt
    row["sample"] = _sample(work / "out" / "best", prompt)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| algo | reward | lr | gold SFT -> best | RM score | reward | win rate vs "
             "pretrained | KL | bpb change | best step | wall | sample of the best policy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['algo']} | {row['reward']} | {row['lr']:g} | "
                         f"stopped: {row['error']} |  |  |  |  |  |  | "
                         f"{row['seconds']:.0f} s |  |")
            continue
        sample = row["sample"].replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {row['algo']} | {row['reward']} | {row['lr']:g} | "
            f"{row['gold_before']:.3f} -> {row['gold_after']:.3f} | {row['rm_after']:.2f} | "
            f"{row['reward_before']:.2f} -> {row['reward_after']:.2f} | "
            f"{row['win_rate']:.3f} | {row['kl_best']:.2f} | "
            f"{row['val_bpb_change_pct']:+.2f}% | {row['best_step']} | "
            f"{row['seconds']:.0f} s | {sample} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repo", type=Path, help="a repository where dvc repro sft has run")
    parser.add_argument("--rows", default="", help="algo:reward,... (default: all)")
    parser.add_argument("--out", type=Path, help="write the table (and rows.json) here too")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-rlhf-") as scratch:
        for algo, reward in _rows(args.rows):
            work = Path(scratch) / f"{algo}-{reward}"
            work.mkdir()
            row = run_one(args.repo.resolve(), work, algo, reward)
            rows.append(row)
            print(f"{algo} / {reward}: {row.get('error') or row['gold_after']} "
                  f"({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
    publish(table(rows), args.out)
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
