"""The tokenizer library: bpe/word/char building, loading, round trips and tiktoken == HF."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import pre_tokenizers

from pipeline.core.errors import GptpipeError
from pipeline.core.io import sha256_file
from pipeline.core.params import VocabParams, parse_params
from pipeline.data.tokenizer import (
    SPECIAL_TOKENS,
    TextTokenizer,
    bytes_to_unicode,
    detect_kind,
    load_tokenizer,
    train_tokenizer,
)

CORPUS = [
    "The river runs north of the city; it's known for its music, and they'll say so.",
    "Les élèves ont étudié l'histoire à Paris en 1998 — déjà célèbre.",
    "El niño comió jamón y piña en la montaña española.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Emoji: 😀 👍🏽 🇫🇷 and digits 12345 67890 3.14159 1,000,000.",
    "Tabs\tand\nnewlines\n\n  spaced    out   text  \r\n end.",
    "Don't won't can't I'm you're we've she'd 'quoted' \"double\".",
    "Ünïcödé äöü ß ÆØÅ čšž ĳ ﬁ Ω≈ç√∫ ∑ ∞ ≠ ≤ ≥ → ← ↑",
] * 8

VARIED = [
    "",
    " ",
    "a",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "\n\n\nthree newlines\n\n",
    "runs     of      spaces\t\t\ttabs",
    "it's they're we'll I'd 'S 'LL",
    "Crème brûlée, naïve café, Ångström, Øresund",
    "中文字符和日本語の文字、한국어 텍스트",
    "😀😀😀 👩‍👩‍👧‍👦 🏳️‍🌈 emoji sequences",
    "1234567890 3.14 1e10 0x1F 1,000",
    "mixed123abc 456def ---=== !!! ??? ... ,,,",
    "\u00a0nbsp\u2009thin\u3000ideographic\u200bzero-width",
    "<eos> <pad><unk> literal <bos>specials",
    "combining e\u0301 a\u0308 and precomposed é ä",
    "\x00\x01\x7f control bytes \u0085 \u2028 \u2029",
    "a" * 300,
    " ".join(["the"] * 50),
]


def params(**values: object) -> VocabParams:
    return parse_params({"vocab": values}).vocab


@pytest.fixture(scope="module")
def bpe() -> TextTokenizer:
    # Generated strings in the training text give merges across odd byte mixes too.
    return train_tokenizer(
        params(kind="bpe", vocab_size=1000), [*CORPUS, *generated_strings(400, seed=3)]
    )


@pytest.fixture(scope="module")
def bpe_pair(bpe: TextTokenizer, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    bpe.save(path)
    return load_tokenizer(path), load_tokenizer(path, fast=False)


def generated_strings(count: int, seed: int) -> list[str]:
    """Random mixes of letters, accents, CJK, emoji, digits, quotes and whitespace."""
    rng = random.Random(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCXYZ éèàüñçßøЖжλ中文日本語한😀👍🏽0123456789")
    alphabet += list("'’\".,;:!?-_()[]<>/\\@#$%^&*+=~` \n\t\r\u00a0\u3000")
    alphabet += ["'s", "'ll", "'re", " the", "ing", "<eos>", "  ", "\n\n", "\r\n"]
    return ["".join(rng.choices(alphabet, k=rng.randint(0, 60))) for _ in range(count)]


def test_specials_are_ids_0_to_3_for_every_kind() -> None:
    for kind in ("bpe", "word", "char"):
        tok = train_tokenizer(params(kind=kind, vocab_size=300, min_freq=1), CORPUS)
        assert [tok.hf.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
        assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)


def test_bpe_has_the_requested_size_and_never_unk(bpe: TextTokenizer) -> None:
    assert bpe.vocab_size == 1000
    ids = [i for row in bpe.encode_batch([*VARIED, *generated_strings(200, 1)]) for i in row]
    assert bpe.unk_id not in ids


def test_bytes_to_unicode_is_the_byte_level_alphabet() -> None:
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256
    assert set(mapping.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert mapping[ord(" ")] == "Ġ" and mapping[ord("\n")] == "Ċ"


def test_fast_path_is_used_and_matches_hf_on_varied_text(bpe_pair: tuple) -> None:
    fast, slow = bpe_pair
    assert fast.uses_fast_encoder and not slow.uses_fast_encoder
    texts = VARIED + CORPUS[:8]
    assert fast.encode_batch(texts) == slow.encode_batch(texts)


def test_fast_path_matches_hf_on_generated_strings(bpe_pair: tuple) -> None:
    fast, slow = bpe_pair
    texts = generated_strings(3000, seed=7)
    assert fast.encode_batch(texts) == slow.encode_batch(texts)


def test_fast_path_matches_hf_across_unicode_planes(bpe_pair: tuple) -> None:
    fast, slow = bpe_pair
    # Every 89th code point, alone, doubled, after a space/letter/digit: exercises the
    # regex classes (\p{L}, \p{N}, \s) of both engines on all planes.
    points = [chr(c) for c in range(0, 0x110000, 89) if not 0xD800 <= c <= 0xDFFF]
    texts = [f"{c}{c} a{c} {c}1{c}\n{c}" for c in points]
    assert fast.encode_batch(texts) == slow.encode_batch(texts)


def test_literal_special_strings_are_ordinary_text(bpe_pair: tuple) -> None:
    fast, slow = bpe_pair
    text = "before <eos> middle <pad><unk><bos> after"
    assert fast.encode_batch([text]) == slow.encode_batch([text])
    for tok in (fast, train_tokenizer(params(kind="char", min_freq=1), [*CORPUS, text])):
        (ids,) = tok.encode_batch([text])
        assert not set(ids) & {0, 1, 2, 3}
        assert tok.decode(ids) == text


def test_bpe_and_char_round_trip_unicode(bpe: TextTokenizer) -> None:
    char = train_tokenizer(params(kind="char", min_freq=1), [*CORPUS, *VARIED])
    for tok in (bpe, char):
        for text, ids in zip(VARIED, tok.encode_batch(VARIED), strict=True):
            assert tok.decode(ids) == text


def test_char_is_one_token_per_character() -> None:
    char = train_tokenizer(params(kind="char", min_freq=1), CORPUS)
    text = "Paris é 😀\n日本"
    (ids,) = char.encode_batch([text])
    assert len(ids) == len(text)
    assert [char.id_to_token(i) for i in ids] == list(text)


def test_word_lowercases_isolates_punctuation_and_joins_with_spaces() -> None:
    word = train_tokenizer(params(kind="word", min_freq=1, lowercase=True), CORPUS)
    (ids,) = word.encode_batch(["The River, runs."])
    assert [word.id_to_token(i) for i in ids] == ["the", "river", ",", "runs", "."]
    assert word.decode(ids) == "the river , runs ."
    cased = train_tokenizer(params(kind="word", min_freq=1), CORPUS)
    assert cased.encode_batch(["The"])[0] != cased.encode_batch(["the"])[0]


def test_word_unknowns_become_unk() -> None:
    word = train_tokenizer(params(kind="word", min_freq=2), ["alpha beta alpha beta gamma"])
    (ids,) = word.encode_batch(["alpha zeta beta gamma"])
    assert ids[1] == word.unk_id and ids[3] == word.unk_id  # zeta unseen, gamma seen once
    assert word.decode(ids) == "alpha <unk> beta <unk>"


def test_word_and_char_max_size_counts_the_specials() -> None:
    word = train_tokenizer(params(kind="word", min_freq=1, max_size=10), CORPUS)
    char = train_tokenizer(params(kind="char", min_freq=1, max_size=12), CORPUS)
    assert (word.vocab_size, char.vocab_size) == (10, 12)


def test_training_is_deterministic() -> None:
    for kind in ("bpe", "word", "char"):
        p = params(kind=kind, vocab_size=400, min_freq=1)
        assert train_tokenizer(p, CORPUS).sha256 == train_tokenizer(p, iter(CORPUS)).sha256


def test_save_and_load_recover_kind_sha_and_ids(tmp_path: Path) -> None:
    for kind in ("bpe", "word", "char"):
        tok = train_tokenizer(params(kind=kind, vocab_size=300, min_freq=1, lowercase=True), CORPUS)
        path = tmp_path / f"{kind}.json"
        tok.save(path)
        loaded = load_tokenizer(path)
        assert loaded.kind == kind == detect_kind(json.loads(path.read_text()))
        assert loaded.sha256 == tok.sha256 == sha256_file(path)
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.encode_batch(VARIED) == tok.encode_batch(VARIED)


def test_too_small_corpus_for_bpe_names_the_key_and_maximum() -> None:
    with pytest.raises(GptpipeError) as err:
        train_tokenizer(params(kind="bpe", vocab_size=5000), ["ab"], where="data/split/train")
    message = str(err.value)
    assert message.startswith("data/split/train:")
    assert "vocab.vocab_size = 5000" in message and "at 261 tokens" in message
    assert "vocab.vocab_size <= 261" in message


def test_word_and_char_with_nothing_frequent_enough_name_min_freq() -> None:
    for kind, unit in (("word", "word"), ("char", "character")):
        with pytest.raises(GptpipeError, match=rf"no {unit} occurs vocab.min_freq = 9 times"):
            train_tokenizer(params(kind=kind, min_freq=9), ["abc def"], where="train")


def test_fast_path_falls_back_when_merge_ranks_and_ids_disagree(
    bpe: TextTokenizer, tmp_path: Path
) -> None:
    bpe.save(tmp_path / "bpe.json")
    config = json.loads((tmp_path / "bpe.json").read_text())
    merges = config["model"]["merges"]
    merges[0], merges[1] = merges[1], merges[0]
    path = tmp_path / "swapped.json"
    path.write_text(json.dumps(config))
    swapped = load_tokenizer(path)
    assert not swapped.uses_fast_encoder
    assert swapped.decode(swapped.encode_batch(["Hello there"])[0]) == "Hello there"


def test_missing_tokenizer_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(GptpipeError, match=r"nope\.json: tokenizer not found"):
        load_tokenizer(tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not valid JSON"),
        ('{"model": 3}', "not a Hugging Face tokenizer JSON"),
    ],
)
def test_invalid_tokenizer_file_names_it(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(GptpipeError) as err:
        load_tokenizer(path)
    assert str(err.value).startswith(f"{path}:") and expected in str(err.value)
    assert "\n" not in str(err.value)


def test_foreign_layout_and_moved_specials_are_rejected(bpe: TextTokenizer, tmp_path: Path) -> None:
    bpe.save(tmp_path / "bpe.json")
    original = (tmp_path / "bpe.json").read_text()
    config = json.loads(original)
    config["decoder"] = None
    path = tmp_path / "foreign.json"
    path.write_text(json.dumps(config))
    with pytest.raises(GptpipeError, match="unrecognised tokenizer layout"):
        load_tokenizer(path)
    config = json.loads(original)
    vocab = config["model"]["vocab"]
    vocab["<pad>"], vocab["<unk>"] = 1, 0
    for added in config["added_tokens"]:
        added["id"] = {0: 1, 1: 0}.get(added["id"], added["id"])
    path.write_text(json.dumps(config))
    with pytest.raises(GptpipeError, match=r"special token <pad> has id 1"):
        load_tokenizer(path)
