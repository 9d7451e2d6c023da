"""lm-eval-tasks: write the multiple-choice tasks evaluate scores as lm-evaluation-harness
tasks, to score an exported model on the very same items.

Not a DVC stage: a folder to hand to ``lm_eval --include_path`` (docs/lm_eval.md).

Reads:  --test-text (the test split, data/split/test: the builtin next-sentence task's
        text) and --task-file (a JSONL task), as ``gptpipe evaluate`` reads them.
Params: the ``evaluate`` section: task (builtin, file or both: which tasks), task_items,
        task_choices and task_seed (the builtin items, as evaluate draws them).
Writes: --out, a folder holding per task a YAML (``gptpipe_next_sentence``,
        ``gptpipe_task_file``: the task names) and its items as JSONL in gptpipe's task
        file format (context, choices, label), and ``gptpipe_lm_eval.py``, which loads
        the items beside it: the folder can be moved or copied whole.

Each task is a zero-shot ``multiple_choice`` task whose ``target_delimiter`` is empty,
so every choice follows the context exactly as written, as gptpipe scores it. lm-eval
reports four accuracies; three are gptpipe's own:

- ``acc`` is gptpipe's ``acc`` (the highest total log-likelihood);
- ``acc_bytes`` is gptpipe's ``acc_norm`` (log-likelihood per UTF-8 byte of the
  choice); lm-eval's ``acc_norm`` divides by characters instead, the same on ASCII text;
- ``acc_mutual_info`` is gptpipe's ``acc_pmi`` (the choice's log-likelihood after the
  context minus after ``<bos>`` alone).

lm-eval encodes context and choice together and takes the choice's tokens after the
context's own; gptpipe encodes them apart. The two agree wherever the tokenizer splits
between the context and the choice (a space, a newline or a sentence end between them,
as in the builtin items), and they sum float32 log-probabilities where gptpipe sums them
in float64, so two choices within about 1e-5 of each other can rank apart.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.core.errors import GptpipeError
from pipeline.core.io import atomic_dir
from pipeline.core.params import Params
from pipeline.core.stage import say, stage_command
from pipeline.lm.tasks import Item, next_sentence_items, read_task_file

# evaluate's name for a task (its metrics' prefix) -> the lm-eval task name.
TASK_NAMES = {"next_sentence": "gptpipe_next_sentence", "task_file": "gptpipe_task_file"}
LOADER = "gptpipe_lm_eval"

# lm-eval resolves `!function` beside the YAML that names it, and hands dataset_kwargs to
# the function: the items travel with the folder, wherever lm_eval runs from.
_LOADER_SOURCE = '''"""A task's items for lm-evaluation-harness (written by gptpipe lm-eval-tasks).

Each task YAML beside this file names its items, a JSONL file also beside it, in
dataset_kwargs.data_file; lm-eval calls load() with them (custom_dataset).
"""

from pathlib import Path

import datasets


def load(data_file, **metadata):
    path = Path(__file__).with_name(data_file)
    return datasets.load_dataset("json", data_files={"test": str(path)})
'''

_METRICS = ("acc", "acc_norm", "acc_bytes", "acc_mutual_info")


def task_yaml(task_name: str, data_file: str, items: int) -> str:
    """The lm-eval task configuration of ``task_name``, whose ``items`` items are the
    JSONL ``data_file`` beside it (the module docstring says what it scores)."""
    metrics = "".join(f"  - metric: {metric}\n    aggregation: mean\n"
                      f"    higher_is_better: true\n" for metric in _METRICS)
    return (
        f"# Written by gptpipe lm-eval-tasks: {items} items, scored as gptpipe evaluate\n"
        "# scores them (acc = acc, acc_bytes = acc_norm, acc_mutual_info = acc_pmi).\n"
        f"task: {task_name}\n"
        f"custom_dataset: !function {LOADER}.load\n"
        "dataset_kwargs:\n"
        f"  data_file: {data_file}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: context\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "# Each choice follows the context as written (it carries its own space).\n"
        'target_delimiter: ""\n'
        "num_fewshot: 0\n"
        f"metric_list:\n{metrics}"
        "metadata:\n"
        "  version: 1\n"
    )


def items_jsonl(items: Sequence[Item]) -> str:
    """``items`` in gptpipe's task file format, one JSON object per line."""
    return "".join(json.dumps({"context": item.context, "choices": list(item.choices),
                               "label": item.label}, ensure_ascii=False) + "\n"
                   for item in items)


def write_lm_eval_tasks(out: Path, tasks: Mapping[str, Sequence[Item]]) -> list[str]:
    """Write ``tasks`` (lm-eval task name -> items) into the folder ``out``, whole or not
    at all; returns the task names. A task without items is refused in one line."""
    if not tasks:
        raise GptpipeError(f"{out}: no task to write; allowed: at least one task")
    for name, items in tasks.items():
        if not items:
            raise GptpipeError(f"{out}: task {name} has no items; allowed: a task with at "
                               "least one item")
    with atomic_dir(out) as tmp:
        (tmp / f"{LOADER}.py").write_text(_LOADER_SOURCE, encoding="utf-8")
        for name, items in tasks.items():
            data_file = f"{name}.jsonl"
            (tmp / data_file).write_text(items_jsonl(items), encoding="utf-8")
            (tmp / f"{name}.yaml").write_text(task_yaml(name, data_file, len(items)),
                                              encoding="utf-8")
    return list(tasks)


def evaluate_tasks(params: Params, test_text: Path, task_file: Path) -> dict[str, list[Item]]:
    """The tasks ``evaluate.task`` asks for, as lm-eval task name -> items: the very items
    gptpipe evaluate scores."""
    settings = params.evaluate
    if settings.task == "none":
        raise GptpipeError("evaluate.task = none: no task to write; allowed: builtin, file "
                           "or both")
    tasks: dict[str, list[Item]] = {}
    if settings.task in ("builtin", "both"):
        tasks[TASK_NAMES["next_sentence"]] = next_sentence_items(
            test_text, settings.task_items, settings.task_choices, settings.task_seed)
    if settings.task in ("file", "both"):
        tasks[TASK_NAMES["task_file"]] = read_task_file(task_file)
    return tasks


def run(params: Params, *, test_text: Path, task_file: Path, out: Path) -> dict[str, int]:
    """Write the lm-eval tasks of ``evaluate.task`` into ``out``; returns items per task."""
    tasks = evaluate_tasks(params, test_text, task_file)
    write_lm_eval_tasks(out, tasks)
    counts = {name: len(items) for name, items in tasks.items()}
    listed = ", ".join(f"{name} ({count} items)" for name, count in counts.items())
    say("lm-eval-tasks", f"{listed} -> {out} (lm_eval --include_path {out} --tasks "
                         f"{','.join(counts)})")
    return counts


main = stage_command(
    "lm-eval-tasks", run,
    test_text="The test split (data/split/test): the builtin next-sentence task's text.",
    task_file="The JSONL multiple-choice task, read when evaluate.task is file or both.",
    out="The folder to write the lm-eval tasks into (replaced whole).",
)
