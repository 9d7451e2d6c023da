"""Preference pairs: JSONL validation, round trip, the held-out split, builtin labels, the stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import REPO_ROOT, save_tiny_checkpoint, synthetic_documents

from pipeline.alignment.gold import GoldJudge
from pipeline.alignment.preference_data import (
    Pair,
    builtin_pairs,
    heldout_split,
    read_pairs_jsonl,
    val_prompts,
    write_pairs_jsonl,
)
from pipeline.cli import cli
from pipeline.core.errors import GptpipeError
from pipeline.core.io import MAX_JSONL_LINE_BYTES
from pipeline.core.params import GoldParams, PreferencesParams
from pipeline.data.doctable import DocumentWriter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLE_FILE = REPO_ROOT / "data" / "builtin" / "example-preferences.jsonl"
GOOD = {"prompt": "The river", "chosen": " flows to the sea.", "rejected": " the the the"}


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory) -> Path:
    """A char tokenizer, a random 1-layer GPT saved as a checkpoint, and a val table."""
    root = tmp_path_factory.mktemp("prefs")
    documents = synthetic_documents(60, seed=5)
    save_tiny_checkpoint(root, documents, kind="char", n_layer=1)
    (root / "val").mkdir()
    with DocumentWriter(root / "val") as writer:
        for index, text in enumerate(documents[:40]):
            writer.append(id=index, source="test", text=text)
    return root


def _write_lines(path: Path, lines: list[str | bytes]) -> Path:
    raw = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n"
                   for line in lines)
    path.write_bytes(raw)
    return path


# ------------------------------------------------------------------------------- JSONL


BAD_LINES = [
    ("{not json", "not valid JSON"),
    ('["prompt", "chosen", "rejected"]', "a JSON list"),
    ('{"prompt": "a", "chosen": "b"}', "field 'rejected' missing"),
    ('{"chosen": "b", "rejected": "c"}', "field 'prompt' missing"),
    ('{"prompt": "a", "chosen": 3, "rejected": "c"}', "field 'chosen' is a int"),
    ('{"prompt": null, "chosen": "b", "rejected": "c"}', "field 'prompt' is a NoneType"),
    ('{"prompt": "a", "chosen": "b", "rejected": "  "}', "field 'rejected' is empty"),
    ('{"prompt": "a", "chosen": "same", "rejected": "same"}',
     "chosen and rejected are the same text"),
    (b'{"prompt": "a\xff", "chosen": "b", "rejected": "c"}', "not valid UTF-8 (byte 0xff"),
    ('{"prompt": "a", "chosen": "b\\ud800", "rejected": "c"}',
     "field 'chosen' holds a lone surrogate"),
]


@pytest.mark.parametrize(("bad", "needle"), BAD_LINES)
def test_each_bad_line_is_one_line_naming_file_and_line(tmp_path, bad, needle):
    path = _write_lines(tmp_path / "p.jsonl", [json.dumps(GOOD), "", bad, json.dumps(GOOD)])
    with pytest.raises(GptpipeError) as caught:
        read_pairs_jsonl(path, min_pairs=1)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{path}: line 3: {needle}" in message


def test_an_empty_prompt_blank_lines_crlf_and_extra_keys_are_accepted(tmp_path):
    path = _write_lines(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "", "chosen": "A fine day.", "rejected": "day day", "id": 7})
        + "\r",
        "   ",
        json.dumps(GOOD),
    ])
    pairs = read_pairs_jsonl(path, min_pairs=2)
    assert pairs == [Pair("", "A fine day.", "day day"), Pair(**GOOD)]


def test_too_few_pairs_and_missing_file_are_refused(tmp_path):
    path = _write_lines(tmp_path / "p.jsonl", [json.dumps(GOOD)])
    with pytest.raises(GptpipeError, match=r"1 preference pairs, fewer than .*min_pairs = 2"):
        read_pairs_jsonl(path, min_pairs=2)
    with pytest.raises(GptpipeError, match="preferences file not found"):
        read_pairs_jsonl(tmp_path / "absent.jsonl")


def test_write_then_read_round_trips(tmp_path):
    pairs = [
        Pair("Zürich est", " une ville « suisse ».\nNew line", " 日本 😀"),
        Pair("", 'quote " and \\ backslash', "tab\tand \u2028 separator"),
    ]
    write_pairs_jsonl(tmp_path / "out.jsonl", pairs)
    assert read_pairs_jsonl(tmp_path / "out.jsonl") == pairs
    assert len((tmp_path / "out.jsonl").read_bytes().split(b"\n")) == 3  # 2 lines + final ""


def test_heldout_split_is_stable_and_keeps_a_prompt_on_one_side():
    pairs = [Pair(f"prompt {i % 50}", f"good {i}", f"bad {i}") for i in range(200)]
    train, heldout = heldout_split(pairs, 0.25)
    assert heldout_split(pairs, 0.25) == (train, heldout)
    assert len(train) + len(heldout) == 200
    assert not {p.prompt for p in train} & {p.prompt for p in heldout}
    assert 0.1 < len(heldout) / 200 < 0.4
    # Adding pairs moves none of the old ones.
    more_train, more_heldout = heldout_split([*pairs, Pair("new", "x", "y")], 0.25)
    assert set(train) <= set(more_train) and set(heldout) <= set(more_heldout)


def test_the_example_file_is_valid_and_the_gold_judge_agrees_with_it():
    pairs = read_pairs_jsonl(EXAMPLE_FILE, min_pairs=32)
    judge = GoldJudge.from_params(GoldParams())
    agree = [judge.score(p.prompt, p.chosen) > judge.score(p.prompt, p.rejected) for p in pairs]
    assert sum(agree) / len(agree) >= 0.9
    train, heldout = heldout_split(pairs, PreferencesParams().heldout_fraction)
    assert train and heldout


# ---------------------------------------------------------------------------- builtin


def _builtin(setup: Path, **overrides):
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.lm.checkpoint import load_model

    # 16 characters: "Document 7. Ear", distinct for each synthetic document.
    params = PreferencesParams(**{"num_prompts": 12, "prompt_tokens": 16, "max_new_tokens": 24,
                                  "min_pairs": 1, "seed": 3, **overrides})
    model, _ = load_model(setup / "model")
    tokenizer = load_tokenizer(setup / "tokenizer.json")
    judge = GoldJudge.from_params(GoldParams())
    return builtin_pairs(model, tokenizer, setup / "val", params, judge, "cpu"), judge


def test_a_small_val_split_gives_its_later_sentences_round_by_round(tiny_setup, tmp_path):
    from pipeline.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_setup / "tokenizer.json")
    (tmp_path / "val").mkdir()
    with DocumentWriter(tmp_path / "val") as writer:
        writer.append(id=0, source="a", text="Music of war. The king played. Early people.")
        writer.append(id=1, source="b", text="North island. South river.")
        writer.append(id=2, source="c", text="Art.")  # too short for a prompt: no opening
    prompts = val_prompts(tokenizer, tmp_path / "val", 5, prompt_tokens=4)
    # Openings first, then every document's second sentence, then every third.
    assert [tokenizer.decode(ids) for ids in prompts] == ["Musi", "Nort", "The ", "Sout",
                                                          "Earl"]
    assert len(val_prompts(tokenizer, tmp_path / "val", 9, prompt_tokens=4)) == 5


@pytest.mark.parametrize("copies", [2, 3])
def test_builtin_pairs_are_deterministic_and_chosen_scores_higher(tiny_setup, copies):
    (pairs, stats), judge = _builtin(tiny_setup, completions_per_prompt=copies)
    (again, _), _ = _builtin(tiny_setup, completions_per_prompt=copies)
    assert pairs == again
    assert stats["prompts"] == 12
    assert stats["pairs"] == len(pairs) == 12 - stats["ties_dropped"] - stats["empty_dropped"]
    assert len(pairs) >= 8
    documents = synthetic_documents(60, seed=5)
    for pair in pairs:
        assert any(doc.startswith(pair.prompt) for doc in documents)
        assert len(pair.prompt) == 16  # char tokenizer: one token per character
        assert pair.chosen != pair.rejected and pair.chosen.strip() and pair.rejected.strip()
        # noise 0: the higher gold score is always chosen.
        assert judge.score(pair.prompt, pair.chosen) >= judge.score(pair.prompt, pair.rejected)
    assert stats["gold_chosen_mean"] >= stats["gold_rejected_mean"]
    (other, _), _ = _builtin(tiny_setup, completions_per_prompt=copies, seed=4)
    assert other != pairs


def test_builtin_pairs_refuse_prompt_and_completion_longer_than_the_context(tiny_setup):
    with pytest.raises(GptpipeError, match=r"= 73 tokens, more than the model's context"):
        _builtin(tiny_setup, prompt_tokens=8, max_new_tokens=64)


# ------------------------------------------------------------------------------ stage


def _params_file(path: Path, **preferences) -> Path:
    path.write_text(yaml.safe_dump({"preferences": {
        "num_prompts": 24, "prompt_tokens": 16, "max_new_tokens": 24, "min_pairs": 4,
        "device": "cpu",
        "heldout_fraction": 0.3, **preferences}}))
    return path


def _run_stage(setup: Path, work: Path, params: Path, file: Path = EXAMPLE_FILE):
    args = ["preferences", "--params", str(params), "--model", str(setup / "model"),
            "--prompts-from", str(setup / "val"), "--file", str(file),
            "--out", str(work / "prefs"), "--metrics", str(work / "metrics.json")]
    return CliRunner().invoke(cli, args)


def test_stage_builtin_writes_splits_meta_and_metrics(tiny_setup, tmp_path):
    result = _run_stage(tiny_setup, tmp_path, _params_file(tmp_path / "params.yaml"))
    assert result.exit_code == 0, result.output
    out = tmp_path / "prefs"
    assert sorted(p.name for p in out.iterdir()) == ["heldout.jsonl", "meta.json", "train.jsonl"]
    train = read_pairs_jsonl(out / "train.jsonl")
    heldout = read_pairs_jsonl(out / "heldout.jsonl")
    meta = json.loads((out / "meta.json").read_text())
    tokenizer_sha = json.loads((tiny_setup / "model/gptpipe.json").read_text())["tokenizer_sha256"]
    assert meta["source"] == "builtin" and meta["tokenizer_sha256"] == tokenizer_sha
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["pairs.train"] == len(train) and metrics["pairs.heldout"] == len(heldout)
    assert metrics["source"] == "builtin" and metrics["prompts"] == 24
    assert metrics["gold.chosen_mean"] >= metrics["gold.rejected_mean"]
    # noise 0: the judge never scores chosen below rejected; equal scores count half.
    assert metrics["gold.accuracy"] >= 0.5
    assert "preferences: " in result.output
    # The reward stage takes the folder as it is.
    (tmp_path / "reward.yaml").write_text(yaml.safe_dump({"reward": {
        "epochs": 1, "device": "cpu", "baseline_max_features": 100}}))
    result = CliRunner().invoke(cli, [
        "reward", "--params", str(tmp_path / "reward.yaml"), "--model",
        str(tiny_setup / "model"), "--pairs", str(out), "--out", str(tmp_path / "rm"),
        "--metrics", str(tmp_path / "reward.json")])
    assert result.exit_code == 0, result.output
    reward_metrics = json.loads((tmp_path / "reward.json").read_text())
    assert reward_metrics["pairs.heldout"] == len(heldout)


def test_stage_file_source_reads_the_file(tiny_setup, tmp_path):
    params = _params_file(tmp_path / "params.yaml", source="file", min_pairs=32)
    result = _run_stage(tiny_setup, tmp_path, params)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["source"] == "file"
    assert metrics["pairs.train"] + metrics["pairs.heldout"] == len(
        read_pairs_jsonl(EXAMPLE_FILE))
    assert metrics["gold.chosen_mean"] > metrics["gold.rejected_mean"]
    assert json.loads((tmp_path / "prefs/meta.json").read_text())["tokenizer_sha256"] is None


def test_stage_file_source_reads_trls_conversational_pairs(tiny_setup, tmp_path):
    def said(role: str, text: str) -> list[dict]:
        return [{"role": role, "content": text}]

    records = [{"prompt": said("user", f"Where does river {i} flow?"),
                "chosen": said("assistant", "North, to the sea."),
                "rejected": said("assistant", "river river")} for i in range(12)]
    file = tmp_path / "conversations.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in records))
    params = _params_file(tmp_path / "params.yaml", source="file", min_pairs=12)
    result = _run_stage(tiny_setup, tmp_path, params, file)
    assert result.exit_code == 0, result.output
    # The splits hold the pairs as texts: a conversation written out as gptpipe reads it.
    written = [*read_pairs_jsonl(tmp_path / "prefs/train.jsonl"),
               *read_pairs_jsonl(tmp_path / "prefs/heldout.jsonl")]
    assert sorted(p.prompt for p in written) == sorted(
        f"user: Where does river {i} flow?\nassistant:" for i in range(12))
    assert {(p.chosen, p.rejected) for p in written} == {(" North, to the sea.",
                                                          " river river")}


@pytest.mark.parametrize(
    ("lines", "preferences", "needle"),
    [
        ([json.dumps(GOOD), '{"prompt": 1}'], {}, "line 2: field 'prompt' is a int"),
        ([json.dumps(GOOD)] * 3, {"min_pairs": 5},
         "3 preference pairs, fewer than preferences.min_pairs = 5"),
        # One prompt only: every pair lands on the same side of the split.
        ([json.dumps({**GOOD, "chosen": f"ok {i}."}) for i in range(6)], {},
         "pair after holding out preferences.heldout_fraction = 0.3 by prompt (6 pairs)"),
    ],
)
def test_stage_bad_file_is_one_line_exit_2_and_writes_nothing(tiny_setup, tmp_path, lines,
                                                             preferences, needle):
    file = _write_lines(tmp_path / "p.jsonl", lines)
    params = _params_file(tmp_path / "params.yaml", **{"source": "file", "min_pairs": 1,
                                                       **preferences})
    result = _run_stage(tiny_setup, tmp_path, params, file)
    assert result.exit_code == 2
    error_lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(error_lines) == 1 and needle in error_lines[0], result.output
    assert not (tmp_path / "prefs").exists() and not (tmp_path / "metrics.json").exists()


def write_hostile_jsonl(path: Path, hostile: str, good: dict) -> Path:
    """``path``: one good line, then one line of the ``hostile`` kind (see HOSTILE)."""
    first = (json.dumps(good) + "\n").encode()
    if hostile == "over-long line":
        # A sparse file: the second line is MAX_JSONL_LINE_BYTES + 1 zero bytes on disk
        # that take no space, and no newline ends it.
        with path.open("wb") as stream:
            stream.write(first)
            stream.truncate(len(first) + MAX_JSONL_LINE_BYTES + 1)
        return path
    # Nesting far past the limit, or an integer of more digits than Python converts.
    value = "[" * 10_000 + "]" * 10_000 if hostile == "deep nesting" else "1" * 5_000
    second = json.dumps({**good, "prompt": "x"})[:-1] + f', "extra": {value}}}\n'
    path.write_bytes(first + second.encode())
    return path


# Each kind of hostile JSONL line, and what its one-line refusal says.
HOSTILE = {
    "deep nesting": "line 2: not valid JSON (nested deeper than 200 levels)",
    "huge integer": "line 2: not valid JSON (Exceeds the limit",
    "over-long line": f"line 2 is longer than the limit of {MAX_JSONL_LINE_BYTES:,} bytes",
}


@pytest.mark.parametrize("hostile", list(HOSTILE))
def test_stage_refuses_hostile_json_in_one_line_and_writes_nothing(tiny_setup, tmp_path,
                                                                   hostile):
    file = write_hostile_jsonl(tmp_path / "p.jsonl", hostile, GOOD)
    params = _params_file(tmp_path / "params.yaml", source="file", min_pairs=1)
    result = _run_stage(tiny_setup, tmp_path, params, file)
    assert result.exit_code == 2, result.output
    error_lines = result.stderr.strip().splitlines()
    assert len(error_lines) == 1 and f"{file}: {HOSTILE[hostile]}" in error_lines[0], (
        error_lines[:1])
    assert not (tmp_path / "prefs").exists() and not (tmp_path / "metrics.json").exists()


def test_stage_refuses_too_few_builtin_pairs(tiny_setup, tmp_path):
    params = _params_file(tmp_path / "params.yaml", num_prompts=3, min_pairs=10)
    result = _run_stage(tiny_setup, tmp_path, params)
    assert result.exit_code == 2
    assert "pairs from 3 val prompts" in result.output
    assert "fewer than preferences.min_pairs = 10" in result.output
    assert "raise preferences.num_prompts" in result.output
    assert not (tmp_path / "prefs").exists()


def test_a_val_split_out_of_prompts_names_what_gives_more(tiny_setup, tmp_path):
    params = _params_file(tmp_path / "params.yaml", num_prompts=5000, min_pairs=5000)
    result = _run_stage(tiny_setup, tmp_path, params)
    assert result.exit_code == 2
    assert "the val split has no more prompts: use a larger corpus or split.val" in result.output
    assert not (tmp_path / "prefs").exists()
