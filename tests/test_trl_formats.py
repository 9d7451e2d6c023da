"""TRL's data formats in gptpipe, and gptpipe's data in TRL (docs/trl.md): the SFT and
preference records TRL writes, read into gptpipe's texts; the chat template that writes a
conversation as gptpipe does; and TRL's own SFTTrainer and DPOTrainer on a tiny exported
model, fed gptpipe's pairs, training on gptpipe's very token sequences.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import REPO_ROOT, synthetic_documents

from pipeline.alignment.chat import CHAT_TEMPLATE, Message, chat_text
from pipeline.alignment.preference_data import Pair, read_pairs_jsonl, write_pairs_jsonl
from pipeline.alignment.reward_model import encode_pairs
from pipeline.alignment.rewards import load_function, make_scorer
from pipeline.alignment.sft import Example, encode_examples, from_pairs, read_examples
from pipeline.core.errors import GptpipeError
from pipeline.core.params import VocabParams, parse_params
from pipeline.data.tokenizer import BOS_ID, train_tokenizer
from pipeline.lm.checkpoint import load_model, open_model_folder, save_model
from pipeline.lm.model import GPT, GPTConfig
from pipeline.stages import export

pytestmark = pytest.mark.usefixtures("one_torch_thread")
transformers.utils.logging.disable_progress_bar()

DOCS = REPO_ROOT / "docs" / "trl.md"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing here may reach the Hugging Face Hub: every test runs offline."""
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _jsonl(path: Path, records: list) -> Path:
    # ASCII JSON: a lone surrogate travels as the escape \\ud800, as it would from TRL.
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ------------------------------------------------------------------------- the formats

SFT_RECORDS = [  # (TRL's record, the example gptpipe reads: hand-written)
    ({"prompt": "The sky is", "response": " blue."}, Example("The sky is", " blue.")),
    ({"prompt": "The sky is", "completion": " blue."}, Example("The sky is", " blue.")),
    ({"prompt": [user("What color is the sky?")], "completion": [assistant("It is blue.")]},
     Example("user: What color is the sky?\nassistant:", " It is blue.")),
    ({"messages": [{"role": "system", "content": "Be brief."}, user("天空是什么颜色？"),
                   assistant("蓝色。")]},
     Example("system: Be brief.\nuser: 天空是什么颜色？\nassistant:", " 蓝色。")),
    ({"messages": [user("Hi"), assistant("Hello."), user("Sky?"), assistant("Blue.")]},
     Example("user: Hi\nassistant: Hello.\nuser: Sky?\nassistant:", " Blue.")),
    # An answer of several messages: the later ones on their own lines.
    ({"prompt": [], "completion": [assistant("Yes."), user("Sure?"), assistant("Yes.")]},
     Example("assistant:", " Yes.\nuser: Sure?\nassistant: Yes.")),
]


def test_sft_reads_gptpipes_and_trls_records(tmp_path):
    path = _jsonl(tmp_path / "sft.jsonl", [record for record, _ in SFT_RECORDS])
    assert read_examples(path) == [example for _, example in SFT_RECORDS]


PAIR = Pair("user: What color is the sky?\nassistant:", " It is blue.", " It is green.")
PREFERENCE_RECORDS = [
    ({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
     Pair("The sky is", " blue.", " green.")),
    ({"prompt": [user("What color is the sky?")], "chosen": [assistant("It is blue.")],
      "rejected": [assistant("It is green.")]}, PAIR),
    # TRL's implicit prompt: the first messages the two conversations share.
    ({"chosen": [user("What color is the sky?"), assistant("It is blue.")],
      "rejected": [user("What color is the sky?"), assistant("It is green.")]}, PAIR),
    ({"prompt": [], "chosen": [assistant("Oui.")], "rejected": [assistant("Non.")]},
     Pair("assistant:", " Oui.", " Non.")),
]


def test_preferences_read_trls_standard_and_conversational_records(tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", [record for record, _ in PREFERENCE_RECORDS])
    pairs = read_pairs_jsonl(path)
    assert pairs == [pair for _, pair in PREFERENCE_RECORDS]
    # Written back (as the preferences stage writes its splits), they read the same.
    write_pairs_jsonl(tmp_path / "out.jsonl", pairs)
    assert read_pairs_jsonl(tmp_path / "out.jsonl") == pairs


Q = [user("q")]
BAD_SFT = [
    ({"prompt": "a", "response": "b", "completion": "c"}, "both response and completion"),
    ({"messages": [user("hi")]}, "messages[-1] has role 'user'; allowed: 'assistant'"),
    ({"messages": []}, "field 'messages' is a list []; allowed: a list of messages"),
    ({"messages": "hi"}, "field 'messages' is a str 'hi'; allowed: a list of messages"),
    ({"prompt": Q, "completion": [assistant([{"type": "text", "text": "a"}])]},
     "completion[0]: content is a list"),
    ({"prompt": Q, "completion": [assistant("  ")]}, "completion[0] has an empty content"),
    ({"prompt": Q}, "field 'completion' missing"),
    ({"prompt": Q, "completion": [assistant("a")], "messages": 3},
     "field 'messages' is a int 3"),
    ({"messages": [{"role": "us\ner", "content": "q"}, assistant("a")]},
     "messages[0]: role = a str 'us\\ner'; allowed: a non-empty text without line breaks"),
    ({"messages": [{"content": "q"}, assistant("a")]},
     "messages[0] is a dict {'content': 'q'}; allowed: an object with role and content"),
    ({"messages": [user("\ud800"), assistant("a")]},
     "messages[0]: field 'content' holds a lone surrogate"),
]


@pytest.mark.parametrize(("record", "needle"), BAD_SFT)
def test_a_bad_trl_sft_record_is_one_line_naming_file_and_line(tmp_path, record, needle):
    path = _jsonl(tmp_path / "sft.jsonl", [SFT_RECORDS[0][0], record])
    with pytest.raises(GptpipeError) as caught:
        read_examples(path)
    message = str(caught.value)
    assert "\n" not in message.replace("\\n", "")
    assert f"{path}: line 2: {needle}" in message, message


BAD_PAIRS = [
    ({"prompt": Q, "chosen": [assistant("a")], "rejected": "b"},
     "field 'rejected' is a str 'b'; allowed: a list of messages"),
    ({"chosen": [*Q, assistant("a")], "rejected": [*Q, assistant("a")]},
     "chosen and rejected hold the same messages"),
    ({"chosen": [*Q, assistant("a")], "rejected": Q}, "chosen and rejected hold the same"),
    ({"prompt": Q, "chosen": [user("a")], "rejected": [assistant("b")]},
     "chosen[0] has role 'user'; allowed: 'assistant'"),
    ({"prompt": Q, "chosen": [assistant("a")], "rejected": [assistant("a")]},
     "chosen and rejected are the same text"),
    ({"prompt": Q, "chosen": [assistant("")], "rejected": [assistant("b")]},
     "chosen[0] has an empty content"),
    ({"prompt": Q, "chosen": [assistant("a")]}, "field 'rejected' missing"),
]


@pytest.mark.parametrize(("record", "needle"), BAD_PAIRS)
def test_a_bad_trl_preference_record_is_one_line_naming_file_and_line(tmp_path, record,
                                                                     needle):
    path = _jsonl(tmp_path / "pairs.jsonl", [PREFERENCE_RECORDS[0][0], record])
    with pytest.raises(GptpipeError) as caught:
        read_pairs_jsonl(path)
    assert f"{path}: line 2: {needle}" in str(caught.value), str(caught.value)


# -------------------------------------------------------------- an exported tiny model


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project as after `dvc repro`: models/hf/pretrain (a tiny random Llama over a
    byte-level BPE of mixed text, exported by gptpipe) and data/preferences/train.jsonl."""
    root = tmp_path_factory.mktemp("trl")
    pairs = [*(Pair(f"The river {i} is", " long and wide.", " the the the") for i in range(3)),
             *[Pair("北京是", "中国的首都。", "的的的"), Pair("", " A city.", " city city"),
               Pair("def add(a, b):", "\n    return a + b", " add add")] * 3]
    write_pairs_jsonl(_mkdir(root / "data/preferences") / "train.jsonl", pairs)
    texts = [*synthetic_documents(30), *(p.prompt + p.chosen for p in pairs)]
    tokenizer = train_tokenizer(VocabParams(kind="bpe", vocab_size=400, min_freq=1), texts)
    tokenizer.save(root / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context=64, n_layer=2, n_head=2,
                          n_embd=32))
    save_model(root / "models/pretrain/best", model, model.config,
               {"tokenizer_sha256": tokenizer.sha256}, root / "tokenizer.json")
    export.run(parse_params({"export": {"dtype": "float32"}}),
               model=root / "models/pretrain/best", out=root / "models/hf/pretrain")
    return root


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


CONVERSATIONS = [
    ([user("What color is the sky?")], False),
    ([user("What color is the sky?")], True),
    ([user("天空？"), assistant("蓝色。")], False),
    ([{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello."),
      user("Sky?")], True),
]


@pytest.mark.parametrize(("conversation", "generation"), CONVERSATIONS)
def test_the_chat_template_writes_what_gptpipe_writes(project, conversation, generation):
    tokenizer = transformers.AutoTokenizer.from_pretrained(project / "models/hf/pretrain")
    rendered = tokenizer.apply_chat_template(
        conversation, chat_template=CHAT_TEMPLATE, tokenize=False,
        add_generation_prompt=generation)
    ours = chat_text([Message(m["role"], m["content"]) for m in conversation], generation)
    # The template writes the special tokens where gptpipe puts them: <bos> first, <eos>
    # after an answer.
    ends_with_answer = not generation and conversation[-1]["role"] == "assistant"
    assert rendered == "<bos>" + ours + ("<eos>" if ends_with_answer else "")


# ------------------------------------------------------------------ TRL's own trainers


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.DOTALL)


# Appended to the recipe: what TRL tokenized, and a conversational SFT and DPO dataset
# tokenized the same way, for the test to hold against gptpipe's ids.
_REPORT = '''
import json as _json
from datasets import Dataset as _Dataset

def _rows(dataset, *names):
    return [{name: row[name] for name in names} for row in dataset]

_conversations = _json.loads(open("conversations.json", encoding="utf-8").read())
_conv_sft = SFTTrainer(model=AutoModelForCausalLM.from_pretrained("models/hf/pretrain"),
                       processing_class=tokenizer,
                       train_dataset=_Dataset.from_list(_conversations["sft"]),
                       args=SFTConfig(output_dir="models/trl/conv", **settings))
_conv_dpo = DPOTrainer(model=AutoModelForCausalLM.from_pretrained("models/hf/pretrain"),
                       processing_class=tokenizer,
                       train_dataset=_Dataset.from_list(_conversations["pairs"]),
                       args=DPOConfig(output_dir="models/trl/conv", **settings))
_ids = ("prompt_ids", "chosen_ids", "rejected_ids")
with open("trl_tokens.json", "w", encoding="utf-8") as _out:
    _json.dump({"sft": _rows(sft.train_dataset, "input_ids", "labels"),
                "dpo": _rows(dpo.train_dataset, *_ids),
                "conv_sft": _rows(_conv_sft.train_dataset, "input_ids", "labels"),
                "conv_dpo": _rows(_conv_dpo.train_dataset, *_ids),
                "steps": [sft.state.global_step, dpo.state.global_step]}, _out)
'''

CONVERSATIONAL = {
    "sft": [{"prompt": [user("What color is the sky?")], "completion": [assistant("Blue.")]},
            {"prompt": [user("天空？"), assistant("蓝色。"), user("草？")],
             "completion": [assistant("绿色。")]}],
    "pairs": [{"prompt": [user("What color is the sky?")], "chosen": [assistant("Blue.")],
               "rejected": [assistant("the the")]}],
}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_trl_trains_an_export_on_gptpipes_sequences(project, tmp_path):
    pytest.importorskip("trl")
    (project / "conversations.json").write_text(json.dumps(CONVERSATIONAL), encoding="utf-8")
    recipe = _python_blocks()[0]
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", recipe + _REPORT], cwd=project, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    trl = json.loads((project / "trl_tokens.json").read_text(encoding="utf-8"))
    _, _, tokenizer = open_model_folder(project / "models/hf/pretrain")
    context = 64
    pairs = read_pairs_jsonl(project / "data/preferences/train.jsonl")

    # SFT: <bos> prompt completion <eos>, the loss on the completion and <eos> (as gptpipe
    # sft trains on the chosen completions), and the same for conversations.
    _assert_sft(trl["sft"], encode_examples(tokenizer, from_pairs(pairs), context))
    conv = _jsonl(tmp_path / "conv_sft.jsonl", CONVERSATIONAL["sft"])
    _assert_sft(trl["conv_sft"], encode_examples(tokenizer, read_examples(conv), context))

    # DPO: the prompt after <bos>, each completion with <eos>: the reward model's sequences.
    _assert_dpo(trl["dpo"], pairs, tokenizer, context)
    conv = _jsonl(tmp_path / "conv_pairs.jsonl", CONVERSATIONAL["pairs"])
    _assert_dpo(trl["conv_dpo"], read_pairs_jsonl(conv), tokenizer, context)

    # Both trained (a step per 8 examples), and gptpipe reads TRL's model back.
    assert trl["steps"] == [2, 2]
    tuned, _ = load_model(project / "models/trl/dpo")
    exported, _ = load_model(project / "models/hf/pretrain")
    assert not torch.equal(tuned.wte.weight, exported.wte.weight)


def _assert_sft(rows: list[dict], encoded) -> None:
    assert [row["input_ids"] for row in rows] == [e.ids for e in encoded]
    for row, example in zip(rows, encoded, strict=True):
        trained = [label != -100 for label in row["labels"]]
        assert trained == [i >= example.start for i in range(len(example.ids))]
        assert row["input_ids"][0] == BOS_ID and row["input_ids"][-1] == 3  # <eos>, an id


def _assert_dpo(rows: list[dict], pairs: list[Pair], tokenizer, context: int) -> None:
    chosen, rejected = encode_pairs(tokenizer, pairs, context)
    assert [r["prompt_ids"] + r["chosen_ids"] for r in rows] == chosen
    assert [r["prompt_ids"] + r["rejected_ids"] for r in rows] == rejected
    prompts = tokenizer.encode_batch([p.prompt for p in pairs])
    assert [r["prompt_ids"] for r in rows] == [[BOS_ID, *ids] for ids in prompts]


def test_the_documented_trl_style_reward_runs_as_rlhf_reward(project, tmp_path):
    module = tmp_path / "rewards.py"
    module.write_text(_python_blocks()[1], encoding="utf-8")
    name = f"python:{module}:concise"
    _, _, tokenizer = open_model_folder(project / "models/hf/pretrain")
    scorer = make_scorer(name, load_function(str(module), "concise", name),
                         reward_model_scorer=None, judge=None, tokenizer=tokenizer,
                         pretrained=None, likelihood_per_token=True)
    completions = tokenizer.encode_batch([" A short answer.", "", " word" * 25])
    assert scorer([[]] * 3, completions).tolist() == [1.0, 0.0, 0.0]
