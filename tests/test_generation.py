"""Generation: logit filtering by hand, cache == no cache, eos, streaming text, the CLI."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import synthetic_documents

from pipeline.cli import cli
from pipeline.core.errors import GptpipeError
from pipeline.core.params import VocabParams
from pipeline.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    TextTokenizer,
    bytes_to_unicode,
    train_tokenizer,
)
from pipeline.lm.checkpoint import save_model
from pipeline.lm.generate import read_prompt
from pipeline.lm.model import GPT, GPTConfig
from pipeline.lm.sampling import (
    SamplingConfig,
    StreamDecoder,
    encode_prompt,
    filter_logits,
    generate_ids,
    sample_text,
)

INF = math.inf
UNICODE_TEXTS = [
    "Le café naïve à Zürich coûte cher.",
    "日本語のテキストと中文文本。",
    "Emoji: 😀 🎉 👍🏽 and math ∑ ∫ ≠.",
]


def _tiny_gpt(seed: int = 0, vocab_size: int = 50, context: int = 16) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, context=context, n_layer=2, n_head=2, n_embd=32))


def _model_favouring_eos(eos_weight: float) -> GPT:
    """A GPT whose next-token logits are the same at every step: n_embd for every token
    and eos_weight * n_embd for <eos>.

    The blocks' output projections are zero, so each block passes its input through; every
    embedding row is all ones (eos: eos_weight), so the normalized hidden state is all
    ones and its dot product with each (tied) output row is that row's sum.
    """
    model = _tiny_gpt()
    with torch.no_grad():
        for parameter in model.blocks.parameters():
            parameter.zero_()
        model.wte.weight.fill_(1.0)
        model.wte.weight[EOS_ID] = eos_weight
    return model


def _generate(model: GPT, prompt: list[int], config: SamplingConfig, seed: int = 0, **kw):
    return list(generate_ids(model, prompt, config, torch.Generator().manual_seed(seed), **kw))


@pytest.fixture(scope="module")
def word_tokenizer() -> TextTokenizer:
    params = VocabParams(kind="word", min_freq=1, lowercase=True)
    return train_tokenizer(params, synthetic_documents(60))


@pytest.fixture(scope="module")
def bpe_tokenizer() -> TextTokenizer:
    # Small enough that rare characters stay split into single-byte tokens.
    params = VocabParams(kind="bpe", vocab_size=300)
    return train_tokenizer(params, synthetic_documents(40) + UNICODE_TEXTS)


# ---------------------------------------------------------------------- filter_logits


def _finite_positions(logits: torch.Tensor) -> list[list[int]]:
    return [torch.isfinite(row).nonzero().flatten().tolist() for row in logits]


def test_temperature_divides_the_logits():
    logits = torch.tensor([[2.0, 4.0, -1.0]])
    assert torch.equal(filter_logits(logits, temperature=2.0), torch.tensor([[1.0, 2.0, -0.5]]))
    assert torch.equal(filter_logits(logits, temperature=1.0), logits)


def test_temperature_zero_keeps_only_the_argmax_first_index_on_ties():
    logits = torch.tensor([[2.0, 4.0, -1.0], [3.0, 1.0, 3.0]])
    filtered = filter_logits(logits, temperature=0.0)
    assert filtered.tolist() == [[-INF, 4.0, -INF], [3.0, -INF, -INF]]


def test_top_k_keeps_the_k_highest_and_ties_with_the_kth():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [2.0, 2.0, 0.0, 1.0]])
    expected = [[-INF, 3.0, 2.0, -INF], [2.0, 2.0, -INF, -INF]]
    assert filter_logits(logits, top_k=2).tolist() == expected
    # Row 2 has two tokens tied for first: top-1 keeps both rather than pick one.
    assert _finite_positions(filter_logits(logits, top_k=1)) == [[1], [0, 1]]
    assert torch.equal(filter_logits(logits, top_k=0), logits)  # off
    assert torch.equal(filter_logits(logits, top_k=99), logits)  # k >= V keeps everything


# Probabilities 0.125, 0.5, 0.125, 0.25 (sorted: 0.5, 0.25, 0.125 at index 0, 0.125 at 2).
_NUCLEUS = torch.tensor([[0.125, 0.5, 0.125, 0.25]]).log()


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (1.0, [0, 1, 2, 3]),  # off
        (0.9, [0, 1, 2, 3]),  # 0.5 + 0.25 + 0.125 = 0.875 < 0.9: the last token is needed
        (0.8, [0, 1, 3]),  # 0.875 reaches 0.8; of the tied 0.125s the lower index goes first
        (0.7, [1, 3]),  # 0.5 + 0.25 = 0.75 reaches 0.7
        (0.4, [1]),  # 0.5 alone reaches 0.4
        (1e-9, [1]),  # the most likely token is always kept
    ],
)
def test_top_p_keeps_the_smallest_set_that_reaches_the_mass(top_p, kept):
    filtered = filter_logits(_NUCLEUS, top_p=top_p)
    assert _finite_positions(filtered) == [kept]
    assert torch.allclose(filtered[0, kept], _NUCLEUS[0, kept])  # kept logits untouched


def test_top_p_applies_after_top_k_and_temperature():
    # Without top-k, 0.6 needs 0.5 + 0.25. After top-2 the two renormalize to 2/3 and 1/3,
    # and 2/3 alone reaches 0.6.
    assert _finite_positions(filter_logits(_NUCLEUS, top_p=0.6)) == [[1, 3]]
    assert _finite_positions(filter_logits(_NUCLEUS, top_k=2, top_p=0.6)) == [[1]]
    # Temperature 0.5 squares and renormalizes: 1/22, 16/22, 1/22, 4/22. 16/22 = 0.727
    # reaches 0.7 alone (at temperature 1 it took two tokens, see above).
    assert _finite_positions(filter_logits(_NUCLEUS, temperature=0.5, top_p=0.7)) == [[1]]


def test_filter_logits_is_row_wise_and_pure():
    logits = torch.cat([_NUCLEUS, _NUCLEUS.flip(-1)])
    before = logits.clone()
    filtered = filter_logits(logits, temperature=1.0, top_p=0.7)
    assert torch.equal(logits, before)
    assert _finite_positions(filtered) == [[1, 3], [0, 2]]


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -0.1), ("temperature", math.nan), ("top_k", -1), ("top_p", 0.0),
     ("top_p", 1.5), ("max_new_tokens", 0)],
)
def test_sampling_config_refuses_out_of_range_values(field, value):
    with pytest.raises(GptpipeError, match=rf"^{field} = .*; allowed: "):
        SamplingConfig(**{field: value})


# ------------------------------------------------------------------------- generation


@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(temperature=1.0, max_new_tokens=40, stop_at_eos=False),
        SamplingConfig(temperature=0.7, top_k=10, top_p=0.9, max_new_tokens=40, stop_at_eos=False),
        SamplingConfig(temperature=0.0, max_new_tokens=40, stop_at_eos=False),
    ],
    ids=["plain", "top-k-top-p", "greedy"],
)
@pytest.mark.parametrize("prompt_length", [1, 5, 20], ids=lambda n: f"prompt{n}")
def test_cached_and_uncached_generation_give_the_same_tokens(config, prompt_length):
    # Context 16 and 40 new tokens: the window is cut (to 8 tokens) at least twice, and a
    # 20-token prompt is cut before the first step.
    model = _tiny_gpt()
    prompt = [BOS_ID, *torch.randint(4, 50, (prompt_length - 1,)).tolist()]
    cached = _generate(model, prompt, config, seed=7)
    uncached = _generate(model, prompt, config, seed=7, use_cache=False)
    assert len(cached) == 40
    assert cached == uncached


def test_the_cache_costs_one_position_per_token_and_is_rebuilt_when_the_window_is_cut():
    model = _tiny_gpt()
    seen: dict[str, list[int]] = {"cached": [], "uncached": []}
    mode = "cached"
    model.register_forward_pre_hook(lambda _m, args: seen[mode].append(args[0].shape[1]))
    config = SamplingConfig(max_new_tokens=26, stop_at_eos=False)
    _generate(model, [BOS_ID], config)
    mode = "uncached"
    _generate(model, [BOS_ID], config, use_cache=False)
    # 1 prompt token; at 17 tokens the window keeps the last 16 // 2 = 8 and re-runs them
    # (steps 17 and 26).
    assert seen["cached"] == [1] * 16 + [8] + [1] * 8 + [8]
    assert seen["uncached"] == [*range(1, 17), *range(8, 17), 8]


def test_greedy_is_deterministic_and_matches_a_plain_argmax_loop():
    model = _tiny_gpt().eval()
    config = SamplingConfig(temperature=0.0, max_new_tokens=10, stop_at_eos=False)
    first = _generate(model, [BOS_ID], config, seed=0)
    assert first == _generate(model, [BOS_ID], config, seed=123)  # the seed does not matter
    ids = [BOS_ID]
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert first == ids[1:]


def test_a_seed_fixes_the_sample_and_other_seeds_differ():
    model = _tiny_gpt()
    config = SamplingConfig(max_new_tokens=20, stop_at_eos=False)
    assert _generate(model, [BOS_ID], config, seed=1) == _generate(model, [BOS_ID], config, seed=1)
    assert _generate(model, [BOS_ID], config, seed=1) != _generate(model, [BOS_ID], config, seed=2)


def test_generation_stops_right_after_eos():
    model = _model_favouring_eos(2.0)  # eos logit 64 against 32: always eos
    for temperature in (0.0, 1.0):
        config = SamplingConfig(temperature=temperature, max_new_tokens=10)
        assert _generate(model, [BOS_ID], config) == [EOS_ID]
    config = SamplingConfig(max_new_tokens=10, stop_at_eos=False)
    assert _generate(model, [BOS_ID], config) == [EOS_ID] * 10


def test_stopping_at_eos_truncates_the_same_sample():
    # eos logit 35.2 against 32 for the other 49 tokens: p(eos) = 1/3 per token.
    model = _model_favouring_eos(1.1)
    full = _generate(model, [BOS_ID], SamplingConfig(max_new_tokens=30, stop_at_eos=False))
    assert EOS_ID in full and full[0] != EOS_ID  # this seed writes something, then eos
    stopped = _generate(model, [BOS_ID], SamplingConfig(max_new_tokens=30))
    assert stopped == full[: full.index(EOS_ID) + 1]


def test_generation_restores_training_mode_and_leaves_grad_on():
    model = _tiny_gpt().train()
    _generate(model, [BOS_ID], SamplingConfig(max_new_tokens=3))
    assert model.training
    assert torch.is_grad_enabled()


def test_an_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="at least <bos>"):
        _generate(_tiny_gpt(), [], SamplingConfig())


# ------------------------------------------------------------------- prompts and text


def test_encode_prompt_prefixes_bos_and_names_the_words_that_became_unk(word_tokenizer):
    ids, unknown = encode_prompt(word_tokenizer, "The Zebra river quokka zebra")
    assert ids[0] == BOS_ID
    assert ids[1:] == word_tokenizer.encode_batch(["The Zebra river quokka zebra"])[0]
    assert ids.count(word_tokenizer.unk_id) == 3
    assert unknown == ["Zebra", "quokka", "zebra"]  # as typed, before lowercasing
    assert encode_prompt(word_tokenizer, "") == ([BOS_ID], [])
    assert encode_prompt(word_tokenizer, "the river")[1] == []


def test_encode_prompt_on_char_and_bpe_vocabularies(bpe_tokenizer):
    chars = train_tokenizer(VocabParams(kind="char", min_freq=1), synthetic_documents(20))
    assert encode_prompt(chars, "river 日本")[1] == ["日", "本"]
    ids, unknown = encode_prompt(bpe_tokenizer, "ok 🦜 ∑")  # byte-level: never <unk>
    assert unknown == [] and ids[0] == BOS_ID


def _stream(decoder: StreamDecoder, ids: list[int]) -> list[str]:
    return [decoder.feed(token_id) for token_id in ids] + [decoder.flush()]


@pytest.mark.parametrize("text", [*UNICODE_TEXTS, "plain ascii, then ü and 😀"])
def test_stream_decoder_never_prints_half_a_character(bpe_tokenizer, text):
    ids = bpe_tokenizer.encode_batch([text])[0]
    # The test means something only if some character is split over several tokens.
    assert any("\ufffd" in bpe_tokenizer.decode([token_id]) for token_id in ids)
    pieces = _stream(StreamDecoder(bpe_tokenizer), [BOS_ID, *ids, EOS_ID])
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == text
    assert sum(1 for piece in pieces if piece) > 1  # streamed, not all at the end


def test_stream_decoder_flushes_an_unfinished_character_as_a_replacement(bpe_tokenizer):
    lead_byte = bpe_tokenizer.hf.token_to_id(bytes_to_unicode()[0xE6])  # starts a 3-byte char
    decoder = StreamDecoder(bpe_tokenizer)
    text = "".join(decoder.feed(t) for t in bpe_tokenizer.encode_batch(["the river"])[0])
    assert text == "the river"
    assert decoder.feed(lead_byte) == ""
    assert decoder.flush() == "\ufffd"


def test_stream_decoder_continues_a_word_prompt_with_a_space(word_tokenizer):
    prompt_ids, _ = encode_prompt(word_tokenizer, "the river")
    continuation = word_tokenizer.encode_batch(["city was built ."])[0]
    pieces = _stream(StreamDecoder(word_tokenizer, prompt_ids), [*continuation, EOS_ID])
    assert pieces == [" city", " was", " built", " .", "", ""]


def test_sample_text_is_the_continuation_and_fixed_by_the_seed(word_tokenizer):
    model = _tiny_gpt(vocab_size=word_tokenizer.vocab_size)
    config = SamplingConfig(max_new_tokens=12, stop_at_eos=False)
    text = sample_text(model, word_tokenizer, "the river", config, seed=5)
    assert text == sample_text(model, word_tokenizer, "the river", config, seed=5)
    assert text.startswith(" ") and len(text.split()) == 12


# ------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, word_tokenizer) -> Path:
    """A tiny word-vocabulary model checkpoint, as pretrain writes one."""
    root = tmp_path_factory.mktemp("generate")
    tokenizer_file = root / "tokenizer.json"
    word_tokenizer.save(tokenizer_file)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=word_tokenizer.vocab_size, context=16, n_layer=1, n_head=2,
                       n_embd=16)
    meta = {"tokenizer_sha256": word_tokenizer.sha256, "vocab_kind": "word"}
    save_model(root / "model", GPT(config), config, meta, tokenizer_path=tokenizer_file)
    return root / "model"


def _invoke(*args: str, stdin: str | None = None):
    return CliRunner().invoke(cli, ["generate", *args], input=stdin)


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: ")
    for needle in needles:
        assert needle in result.stderr


def test_cli_streams_the_prompt_and_its_continuation(checkpoint):
    args = ("--model", str(checkpoint), "--max-new-tokens", "8", "--device", "cpu")
    result = _invoke(*args, "the river")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("the river ") and result.stdout.endswith("\n")
    assert result.stderr == ""
    assert _invoke(*args, "the river").stdout == result.stdout  # seed 0 by default
    assert _invoke(*args, "--no-cache", "the river").stdout == result.stdout
    assert _invoke(*args, "--seed", "1", "the river").stdout != result.stdout


def test_cli_reads_the_prompt_from_stdin(checkpoint):
    args = ("--model", str(checkpoint), "--max-new-tokens", "4", "--temperature", "0")
    from_argument = _invoke(*args, "the river").stdout
    assert _invoke(*args, "-", stdin="the river\n").stdout == from_argument
    assert _invoke(*args, stdin="the river\n").stdout == from_argument


def test_cli_with_an_empty_prompt_starts_from_bos(checkpoint):
    result = _invoke("--model", str(checkpoint), "--max-new-tokens", "5", stdin="")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n") and len(result.stdout.split()) == 5


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_read_prompt_waits_for_stdin_only_when_it_is_piped():
    assert read_prompt(None, _Terminal("never read")) == ""
    assert read_prompt("-", _Terminal("typed\n")) == "typed"
    assert read_prompt(None, io.StringIO("piped\r\n")) == "piped"
    assert read_prompt(None, io.StringIO("two lines\n\n")) == "two lines\n"
    assert read_prompt("given", io.StringIO("ignored")) == "given"


def test_cli_names_the_prompt_words_that_became_unk_once(checkpoint):
    result = _invoke("--model", str(checkpoint), "--max-new-tokens", "3",
                     "the zebra river quokka zebra")
    assert result.exit_code == 0, result.output
    assert result.stderr == (
        "generate: 2 prompt words are not in the vocabulary and became <unk>: zebra, quokka\n"
    )
    assert result.stdout.startswith("the zebra river quokka zebra ")


def test_cli_refuses_a_tokenizer_of_another_size(checkpoint, tmp_path):
    other = train_tokenizer(VocabParams(kind="word", min_freq=1, max_size=20),
                            synthetic_documents(20))
    other.save(tmp_path / "other.json")
    result = _invoke("--model", str(checkpoint), "--tokenizer", str(tmp_path / "other.json"), "x")
    _one_line_error(result, "other.json", "20 tokens", "gptpipe.json")


def test_cli_refuses_a_tokenizer_of_the_same_size_but_other_contents(checkpoint, tmp_path,
                                                                     word_tokenizer):
    # Same corpus and size, but case kept: another vocabulary behind the same ids.
    params = VocabParams(kind="word", min_freq=1, max_size=word_tokenizer.vocab_size)
    other = train_tokenizer(params, synthetic_documents(60))
    assert other.vocab_size == word_tokenizer.vocab_size and other.sha256 != word_tokenizer.sha256
    other.save(tmp_path / "cased.json")
    result = _invoke("--model", str(checkpoint), "--tokenizer", str(tmp_path / "cased.json"))
    _one_line_error(result, "cased.json", "sha256", "gptpipe.json")


def test_cli_refuses_missing_files_and_bad_options(checkpoint, tmp_path):
    _one_line_error(_invoke("--model", str(tmp_path / "nowhere")), "nowhere", "not found")
    _one_line_error(
        _invoke("--model", str(checkpoint), "--tokenizer", str(tmp_path / "none.json")),
        "none.json", "missing",
    )
    _one_line_error(_invoke("--model", str(checkpoint), "--top-p", "0"), "top_p", "allowed")
    _one_line_error(_invoke("--model", str(checkpoint), "--device", "tpu"), "--device")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("gptpipe.json", "tokenizer.json"):
        (broken / name).write_bytes((checkpoint / name).read_bytes())
    _one_line_error(_invoke("--model", str(broken)), "model.safetensors")
    (broken / "gptpipe.json").unlink()
    _one_line_error(_invoke("--model", str(broken)), "gptpipe.json")
