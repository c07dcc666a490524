"""models/tokenizer.py against transformers on tiny tokenizers written by tools/fixtures/tiny_tokenizer.py."""

import json
import random

import pytest

from models.tokenizer import REPLACEMENT_CHAR, Tokenizer
from tools.fixtures.tiny_tokenizer import write_tokenizer

VOCAB = 1000
PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"
TEXTS = [
    PROMPT,
    "USER: <image>\n<image>\nCompare the two pictures. ASSISTANT:",
    "The cat sat on the mat.",
    "  two leading spaces",
    " one leading space",
    "trailing space ",
    "line one\nline two\n\n\tindented",
    "héllo wörld — naïve café",
    "emoji 😀🐱👍🏽 and CJK 中文字符 日本語 한국어",
    "digits 1234567890 and 3.14159, 8:30",
    "x <image> y<image>z",
    "<s>inside</s> <pad> <unk>",
    "",
    " ",
    "\n",
    "▁literal meta symbol",
]


@pytest.fixture(scope="module")
def json_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok_json")
    write_tokenizer(d, VOCAB, "json")
    return d


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok_sp")
    write_tokenizer(d, VOCAB, "sentencepiece")
    return d


@pytest.fixture(scope="module", params=["json", "sentencepiece"])
def tok(request, json_dir, sp_dir):
    return Tokenizer.from_dir(json_dir if request.param == "json" else sp_dir)


def hf_fast(d):
    # Loads tokenizer.json as written (normalizer, post-processor and all). AutoTokenizer in
    # transformers 5 instead rebuilds a LlamaTokenizer from vocab+merges with a Metaspace
    # pre-tokenizer, which differs on chunks that already start with a space (see below).
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(d))


# --- encode / decode vs transformers -------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_json_matches_transformers(json_dir, text):
    ours, ref = Tokenizer.from_dir(json_dir), hf_fast(json_dir)
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


# AutoTokenizer's Metaspace only prepends "▁" to a chunk that does not already start with a space
# (or "▁"), unlike sentencepiece and the tokenizer.json normalizer: skip texts with such chunks.
@pytest.mark.parametrize("text", [t for t in TEXTS if t and not t.startswith((" ", "▁")) and "> " not in t])
def test_json_matches_autotokenizer(json_dir, text):
    from transformers import AutoTokenizer

    ours, ref = Tokenizer.from_dir(json_dir), AutoTokenizer.from_pretrained(str(json_dir))
    assert ours.encode(text) == ref.encode(text)
    assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_matches_transformers(sp_dir, text):
    # Without protobuf, transformers 5 can only read a bare tokenizer.model through its slow
    # SentencePieceBackend (legacy=True, the LlamaTokenizer slow semantics). It adds no BOS and its
    # generic decode prints byte pieces as "<0x..>", so decode is checked against sentencepiece.
    import sentencepiece as spm
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    ours = Tokenizer.from_dir(sp_dir)
    ref = SentencePieceBackend.from_pretrained(str(sp_dir))
    ids = ours.encode(text)
    assert ids == [ours.bos_token_id] + ref.encode(text)
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    assert ours.decode(ids) == sp.decode([i for i in ids if i not in ours.special_ids])


def test_json_and_sentencepiece_agree_on_structure(json_dir, sp_dir):
    a, b = Tokenizer.from_dir(json_dir), Tokenizer.from_dir(sp_dir)
    for t in (a, b):
        assert (t.bos_token_id, t.eos_token_id, t.image_token_id, t.pad_token_id) == (1, 2, VOCAB, VOCAB + 1)
        assert t.vocab_size == VOCAB + 2
        assert t.special_ids == {0, 1, 2, VOCAB, VOCAB + 1}
    for text in TEXTS:
        assert a.decode(a.encode(text)) == b.decode(b.encode(text))


def test_prompt_layout(tok):
    ids = tok.encode(PROMPT)
    assert ids[0] == tok.bos_token_id and ids.count(tok.image_token_id) == 1
    i = ids.index(tok.image_token_id)
    # legacy LLaMA: the chunk after <image> gets its own "▁" (id of the lone ▁ piece), then "\n" = <0x0A>.
    assert tok.decode(ids[i + 1:i + 2]) == "" and ids[i + 2] == 3 + 0x0A
    assert tok.encode(tok.chat_prompt("Hi?", num_images=3)).count(tok.image_token_id) == 3


def test_chat_prompt(tok):
    assert tok.chat_prompt("What is this?") == "USER: <image>\nWhat is this? ASSISTANT:"
    assert tok.chat_prompt("Q", num_images=2) == "USER: <image>\n<image>\nQ ASSISTANT:"
    assert tok.chat_prompt("Q", num_images=0) == "USER: Q ASSISTANT:"
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="num_images"):
            tok.chat_prompt("Q", num_images=bad)
    with pytest.raises(ValueError, match="question"):
        tok.chat_prompt(None)


def test_sentencepiece_legacy_false(tmp_path):
    write_tokenizer(tmp_path, VOCAB, "sentencepiece")
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    legacy = Tokenizer.from_dir(tmp_path)
    cfg_path.write_text(json.dumps({**cfg, "legacy": False}))
    modern = Tokenizer.from_dir(tmp_path)
    a, b = legacy.encode(PROMPT), modern.encode(PROMPT)
    i = a.index(VOCAB)
    assert a[:i + 1] == b[:i + 1]  # the first chunk keeps its dummy prefix either way
    assert a[i + 1:] == [a[i + 1]] + b[i + 1:]  # legacy=False drops the "▁" after <image>
    assert modern.decode(b) == legacy.decode(a).replace("  \n", " \n")


def test_no_bos_when_config_says_so(tmp_path):
    write_tokenizer(tmp_path, VOCAB, "sentencepiece")
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "add_bos_token": False}))
    assert Tokenizer.from_dir(tmp_path).encode("hi")[0] != 1


# --- streaming ---------------------------------------------------------------------------

def stream(tok, ids, skip=True):
    dec = tok.stream_decoder(skip_special_tokens=skip)
    return [dec.feed(i) for i in ids] + [dec.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_joins_to_decode(tok, text):
    ids = tok.encode(text) + [tok.eos_token_id]
    for skip in (True, False):
        deltas = stream(tok, ids, skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
        if "\ufffd" not in tok.decode(ids, skip_special_tokens=skip):
            assert not any(REPLACEMENT_CHAR in d for d in deltas)


def test_stream_holds_open_byte_runs(tok):
    ids = tok.encode("😀中")[1:]  # byte fallback: 4 + 3 byte pieces after the "▁" piece
    dec = tok.stream_decoder()
    # A byte run is final only once a non-byte piece ends it: nothing comes out before that.
    assert [dec.feed(i) for i in ids] == [""] * len(ids)
    period = tok.encode("a.")[-1]
    assert dec.feed(period) in (" 😀中.", "😀中.") and dec.flush() == ""
    dec = tok.stream_decoder()
    held = [dec.feed(i) for i in ids[:3]]  # "▁" + 2 of the 4 emoji bytes
    assert REPLACEMENT_CHAR not in "".join(held) and dec.flush() == REPLACEMENT_CHAR * 2


def test_stream_random_valid_sequences(tok):
    # Any order of ordinary pieces and whole UTF-8 characters must stream losslessly.
    rng = random.Random(0)
    normal = [i for i in range(3 + 256, VOCAB) if not tok.decode([i]).startswith("\ue000")]
    chars = [[3 + b for b in c.encode()] for c in "😀中é文👍"]  # as byte-fallback pieces <0x..>
    specials = sorted(tok.special_ids)
    for _ in range(50):
        ids = []
        for _ in range(rng.randint(1, 40)):
            r = rng.random()
            ids += rng.choice(chars) if r < 0.3 else [rng.choice(specials)] if r < 0.4 else [rng.choice(normal)]
        for skip in (True, False):
            deltas = stream(tok, ids, skip)
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
            assert not any(REPLACEMENT_CHAR in d for d in deltas)


def test_stream_window_stays_small(tok):
    ids = tok.encode("The cat sat on the mat and 😀 looked at 中文. " * 100)
    dec = tok.stream_decoder()
    widest = 0
    for i in ids:
        dec.feed(i)
        widest = max(widest, len(dec.ids) - dec.prefix_offset)
    assert widest <= 8 and len(ids) > 500


# --- bad input -----------------------------------------------------------------------------

def test_missing_files(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_corrupt_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("kind", ["json", "sentencepiece"])
def test_config_naming_unknown_token(tmp_path, kind):
    write_tokenizer(tmp_path, VOCAB, kind)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "eos_token": "<|no such token|>"}))
    with pytest.raises(ValueError, match="eos_token"):
        Tokenizer.from_dir(tmp_path)


def test_bad_encode_decode_args(tok):
    with pytest.raises(ValueError, match="text"):
        tok.encode(b"bytes")
    for bad in ([tok.vocab_size], [-1], ["3"], [1.0]):
        with pytest.raises(ValueError, match="token id"):
            tok.decode(bad)
    dec = tok.stream_decoder()
    with pytest.raises(ValueError, match="token id"):
        dec.feed(tok.vocab_size)
    assert "".join([dec.feed(i) for i in tok.encode("hi there")] + [dec.flush()]) == "hi there"


# --- tiny tokenizer writer ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["json", "sentencepiece"])
def test_write_tokenizer_sizes(tmp_path, kind):
    for n in (300, 32000):
        d = tmp_path / f"{kind}{n}"
        info = write_tokenizer(d, n, kind)
        assert info == {"bos_token_id": 1, "eos_token_id": 2, "image_token_id": n, "pad_token_id": n + 1,
                        "text_vocab_size": n}
        tok = Tokenizer.from_dir(d)
        assert tok.vocab_size == n + 2 and tok.image_token_id == n
        assert tok.decode(tok.encode("héllo 😀 world")) == "héllo 😀 world"


def test_write_tokenizer_deterministic(tmp_path):
    for kind, name in (("json", "tokenizer.json"), ("sentencepiece", "tokenizer.model")):
        write_tokenizer(tmp_path / "a", 700, kind, seed=3)
        write_tokenizer(tmp_path / "b", 700, kind, seed=3)
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_write_tokenizer_bad_args(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        write_tokenizer(tmp_path, 1000, "bpe")
    with pytest.raises(ValueError, match="text_vocab_size"):
        write_tokenizer(tmp_path, 100)


def test_sentencepiece_without_side_files(tmp_path, sp_dir):
    # An original-LLaVA style directory: just tokenizer.model, no <image> token.
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.image_token_id) == (1, 2, None, None)
    assert tok.vocab_size == VOCAB and tok.encode("<s>hi</s>")[:2] == [1, 1]
    assert tok.chat_prompt("Q") == "USER: <image>\nQ ASSISTANT:"  # the caller splices the image in
