"""The Kimi tiktoken tokenizer of a release directory (files written by the test), the tokenizer
loader's choices and errors, stop tokens, and streaming detokenisation."""

from __future__ import annotations

import json

import pytest
import tiktoken
from kimi_files import KIMI_PAT, NUM_RESERVED, SPECIALS, write_tokenizer_files

from prfaas.server.gateway.text_output import TextAssembler
from prfaas.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    KimiTokenizer,
    TokenizerNotFound,
    load_tokenizer,
    read_stop_token_ids,
    stop_ids_of,
)

TEXTS = [
    "Hello world! The dog's owner said: hello there.",
    "中文你好 world 中文a 123456789 x1y22z333",
    "  leading and trailing spaces   \n\n\tTabs\r\nCRLF\n",
    "café naïve résumé – €5 ½ 😀 ÀÉÎ",
    "I'M SHOUTING, you're quiet, they'LL see; don't",
    "<|im_user|>user<|im_middle|>hi<|im_end|>[EOS] <|reserved_token_400|>",
    "",
]


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    d = tmp_path_factory.mktemp("kimi-tok")
    info = write_tokenizer_files(d)
    return d, info, load_tokenizer(str(d))


def _reference(info) -> tiktoken.Encoding:
    """What tokenization_kimi.py builds: tiktoken over the ranks with Kimi's pattern and the
    special ids n_base .. n_base + 257 named by added_tokens_decoder or reserved names."""
    n = info["n_base"]
    named = {i: s for s, i in info["specials"].items()}
    return tiktoken.Encoding(
        name="ref",
        pat_str=KIMI_PAT,
        mergeable_ranks={t: r for r, t in enumerate(info["vocab"])},
        special_tokens={
            named.get(i, f"<|reserved_token_{i}|>"): i for i in range(n, n + NUM_RESERVED + 2)
        },
    )


def test_kimi_tokenizer_encodes_and_decodes_as_kimi(kimi):
    d, info, tok = kimi
    assert isinstance(tok, KimiTokenizer)
    ref = _reference(info)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, allowed_special="all"), text
        assert tok.encode(text, allow_special=False) == ref.encode(text, disallowed_special=())
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids) == text
        plain = tok.decode(tok.encode(text, allow_special=False))
        assert plain == text


def test_specials_sit_at_their_ids(kimi):
    d, info, tok = kimi
    sp, n = info["specials"], info["n_base"]
    for s in SPECIALS:
        assert tok.encode(s) == [sp[s]]
    assert tok.encode(f"<|reserved_token_{n + 100}|>") == [n + 100]
    assert (tok.bos_token_id, tok.eos_token_id) == (sp["[BOS]"], sp["[EOS]"])
    ids = tok.encode("a<|im_end|>b")
    assert sp["<|im_end|>"] in ids and tok.decode(ids) == "ab"  # decode drops specials
    # as plain text the special's characters are ordinary tokens
    assert sp["<|im_end|>"] not in tok.encode("a<|im_end|>b", allow_special=False)


def test_split_pattern_is_kimis(kimi):
    d, info, tok = kimi
    cross = info["vocab"].index("文a".encode())
    # Han runs are their own pieces: BPE never merges across Han and Latin
    assert cross not in tok.encode("中文a") and tok.decode(tok.encode("中文a")) == "中文a"
    # a pattern without the Han split (GPT-4's) would use the merge
    gpt4ish = tiktoken.Encoding(
        name="x",
        pat_str=r"""[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s+""",
        mergeable_ranks={t: r for r, t in enumerate(info["vocab"])},
        special_tokens={},
    )
    assert cross in gpt4ish.encode("文a")


def test_long_runs_are_cut_like_kimi(kimi):
    d, info, tok = kimi
    text = "a" * 30_000 + " " * 26_000 + "b"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    ref = _reference(info)
    cut = ["a" * 25_000, "a" * 5_000 + " " * 25_000, " " * 1_000 + "b"]
    assert ids == [i for piece in cut for i in ref.encode(piece)]


def test_streaming_never_emits_half_a_character(kimi):
    d, info, tok = kimi
    half = info["vocab"].index(b"\xe2\x82")
    ids = tok.encode("price: €5 and € more 中文 😀!")
    assert half in ids  # '€' is two tokens: its first two bytes, then the third
    asm = TextAssembler(tok)
    pieces = [asm.add([i]) for i in ids]
    pieces.append(asm.finish())
    assert "".join(pieces) == "price: €5 and € more 中文 😀!"
    assert all("\ufffd" not in p for p in pieces)
    at = ids.index(half)
    assert pieces[at] == ""  # held back until the character is complete


def test_stop_token_ids_come_from_config_and_generation_config(tmp_path):
    info = write_tokenizer_files(tmp_path)
    sp = info["specials"]
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": sp["<|im_end|>"]}))
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [sp["<|im_end|>"], sp["[EOT]"]]})
    )
    tok = load_tokenizer(str(tmp_path))
    want = {sp["[EOS]"], sp["<|im_end|>"], sp["[EOT]"]}
    assert set(tok.stop_token_ids) == want == stop_ids_of(tok)
    assert read_stop_token_ids(tmp_path) == tuple(sorted(want - {sp["[EOS]"]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ValueError, match="generation_config.json"):
        load_tokenizer(str(tmp_path))


def test_loader_choices_and_clear_errors(tmp_path):
    assert isinstance(load_tokenizer("tiny"), ByteTokenizer)
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(TokenizerNotFound, match=r"tokenizer\.json.*found \['config\.json'\]"):
        load_tokenizer(str(d))
    (d / "tiktoken.model").write_text("YQ== 0\n")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(TokenizerNotFound, match="LlamaTokenizer"):
        load_tokenizer(str(d))
    # save_checkpoint marks a preset's weights as using the byte tokenizer
    (d / "tiktoken.model").unlink()
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PrfaasByteTokenizer"}))
    assert isinstance(load_tokenizer(str(d)), ByteTokenizer)
    assert isinstance(load_tokenizer(str(d / "config.json")), ByteTokenizer)


def test_saved_preset_checkpoint_loads_the_byte_tokenizer(tiny_model, tmp_path):
    from prfaas.model.checkpoint import save_checkpoint

    save_checkpoint(tiny_model, tmp_path)
    assert isinstance(load_tokenizer(str(tmp_path)), ByteTokenizer)


def test_tokenizer_json_reads_specials_as_text_on_request(tmp_path):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "<|": 1, "end": 2, "|>": 3, "?": 4}, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<|end|>", special=True)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    t = load_tokenizer(str(tmp_path))
    assert isinstance(t, HFTokenizer) and t.eos_token_id == 5 and t.stop_token_ids == (5,)
    assert t.encode("a <|end|>") == [0, 5]
    assert t.encode("a <|end|>", allow_special=False) == [0, 1, 2, 3]
    assert t.encode("a <|end|>") == [0, 5]  # the switch is back


def test_tokenizer_package_is_torch_free():
    """The gateway imports tokenizers and chat templates without the model code."""
    import subprocess
    import sys

    code = (
        "import sys, prfaas.tokenizer, prfaas.tokenizer.chat;"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
