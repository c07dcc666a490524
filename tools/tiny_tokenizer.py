"""Write a small LLaMA-style tokenizer for tests and tiny random-weight checkpoints.

Layout matches the LLaVA-1.5 (Vicuna) tokenizer: 0 <unk>, 1 <s>, 2 </s>, 3..258 the byte-fallback
pieces <0x00>..<0xFF>, then learned pieces up to `text_vocab_size`, then the added tokens
<image> = text_vocab_size and <pad> = text_vocab_size + 1.

    python -m tools.tiny_tokenizer OUT_DIR [TEXT_VOCAB_SIZE] [json|sentencepiece]
"""

from __future__ import annotations

import io
import json
import random
import struct
import sys
from collections import Counter
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
NUM_BASE = len(SPECIALS) + len(BYTES)  # 259: the smallest possible text vocab
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
# Filler pieces pad the vocab when the corpus runs out of merges. They start with a private-use
# character and all have the same length, so no shorter piece is a prefix of one: neither HF BPE
# (no merges produce them) nor sentencepiece BPE (no chain of pieces builds them) can emit them.
FILLER_CHAR = "\ue000"

CORPUS = """\
A photograph shows a small orange cat sitting on a wooden table next to a window. The sun is shining and the light falls across the cat's fur, which looks soft and warm.
USER: What is in the image? ASSISTANT: The image shows a cat resting on a table near a bright window.
The city was quiet in the early morning. A few people walked along the river, and a man on a red bicycle rode past the old bridge while the bells of the church rang seven times.
Large language models learn to predict the next word in a sentence. When they are trained together with a vision encoder, they can answer questions about pictures, describe scenes, read text in images, and count objects.
In the kitchen there were three apples, two bananas, and a bowl of fresh strawberries. She cut the fruit into small pieces, added some yogurt and honey, and served breakfast to her friends at 8:30.
The mountain trail climbs steeply through a forest of pine trees before it reaches an open meadow full of yellow flowers. Hikers often stop there to rest, drink water, and take pictures of the valley below.
Please describe the picture in detail. There is a dog playing with a blue ball in a green park. Children are running, laughing, and flying colorful kites under a clear sky.
Scientists measured the temperature of the lake every day for ten years. They found that the water was getting warmer each summer, and that the ice in winter melted earlier than before.
The train leaves the station at 10:45 and arrives in the capital two hours later. Passengers can buy coffee, tea, sandwiches, and newspapers from a small cart that moves between the cars.
He opened the old book carefully. Its pages were thin and yellow, and the handwriting inside was hard to read, but he could still see a map of an island with a red cross drawn near the northern coast.
What color is the car? The car is red. How many people are in the photo? There are four people standing in front of a building with large glass windows.
The market was crowded with people buying vegetables, bread, cheese, and flowers. Vendors called out their prices, and the smell of roasted coffee and fresh bread filled the air.
A robot arm picks up a box from the conveyor belt, turns it, and places it on a shelf. The camera above the belt checks each label and sends the information to a computer.
Quick facts: 0 1 2 3 4 5 6 7 8 9; (yes) or [no]? "Zebras jump!" - Kelly & Max, 100% sure, #1 @home, 2 + 2 = 4 / 1 * 4.
"""

SYLLABLES = ["ka", "to", "ri", "men", "sol", "ver", "an", "ti", "qu", "la", "zor", "pe", "ni", "dra", "ul",
             "bo", "st", "er", "ing", "ion", "ex", "mo", "ca", "fi", "gru", "ph", "on", "el", "si", "yu"]


def _corpus(n_words: int, seed: int) -> list[str]:
    """The built-in paragraphs plus `n_words` seeded pseudo-words, so big vocabs get real merges."""
    rng = random.Random(seed)
    lines = CORPUS.splitlines()
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 5))) for _ in range(n_words)]
    lines += [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    return lines


def _fillers(n: int) -> list[str]:
    return [f"{FILLER_CHAR}{i:05d}" for i in range(n)]


def _added_tokens_decoder(text_vocab_size: int) -> dict[str, dict]:
    def entry(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    names = {0: "<unk>", 1: "<s>", 2: "</s>", text_vocab_size: IMAGE_TOKEN, text_vocab_size + 1: PAD_TOKEN}
    return {str(i): entry(s) for i, s in names.items()}


def _write_side_files(out: Path, text_vocab_size: int, legacy: bool) -> None:
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": _added_tokens_decoder(text_vocab_size),
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": legacy,
        "model_max_length": 4096,
        "pad_token": PAD_TOKEN,
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
    }
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": PAD_TOKEN,
                   "additional_special_tokens": [IMAGE_TOKEN]}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))


def _write_json(out: Path, text_vocab_size: int, seed: int, corpus: list[str] | None = None) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    budget = text_vocab_size - NUM_BASE  # learned pieces
    # Training splits on ▁ (and digits, like LLaMA's split_digits) so merges never cross words;
    # the saved tokenizer has no pre-tokenizer, exactly like the LLaMA tokenizer.json.
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizer
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("▁", behavior="merged_with_next"), pre_tokenizers.Digits(individual_digits=True)])
    lines = corpus if corpus is not None else _corpus(min(budget, 20000), seed)
    trainer = trainers.BpeTrainer(vocab_size=max(budget, 1), limit_alphabet=max(min(budget, 1000), 1),
                                  show_progress=False, special_tokens=[])
    trainer_tok.train_from_iterator(lines, trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    pieces = sorted(trained["vocab"], key=trained["vocab"].get)[:budget]
    kept = set(pieces)
    merges = [m for m in trained["merges"] if "".join(m) in kept and m[0] in kept and m[1] in kept]
    pieces += _fillers(budget - len(pieces))

    vocab = {p: i for i, p in enumerate(SPECIALS + BYTES + pieces)}
    assert len(vocab) == text_vocab_size, "duplicate piece in the tiny vocab"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in merges], unk_token="<unk>",
                               fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in SPECIALS + [IMAGE_TOKEN, PAD_TOKEN]])
    assert tok.token_to_id(IMAGE_TOKEN) == text_vocab_size and tok.token_to_id(PAD_TOKEN) == text_vocab_size + 1
    tok.save(str(out / "tokenizer.json"))


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _pb_piece(piece: str, score: float) -> bytes:
    """One `ModelProto.pieces` entry (field 1) in protobuf wire format: piece, score, type NORMAL."""
    raw = piece.encode()
    body = b"\x0a" + _pb_varint(len(raw)) + raw + b"\x15" + struct.pack("<f", score) + b"\x18\x01"
    return b"\x0a" + _pb_varint(len(body)) + body


def _write_sentencepiece(out: Path, text_vocab_size: int, seed: int) -> None:
    import sentencepiece as spm

    budget = text_vocab_size - NUM_BASE
    # Start from the largest vocab the corpus supports; the rest is padded with filler pieces.
    lines = _corpus(min(budget, 20000), seed)
    # sentencepiece needs every kept character as a piece: for tiny vocabs drop the rarest ones
    # from the corpus (they become byte fallback, like rare characters in LLaMA).
    counts = Counter("▁" + "".join(lines).replace(" ", "▁"))
    rare = {c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[budget:]}
    if rare:
        lines = ["".join(c for c in line if c not in rare) for line in lines]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=text_vocab_size,
        hard_vocab_limit=False, byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2, max_sentencepiece_length=16)
    model = buf.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=model)
    n = sp.get_piece_size()
    if n > text_vocab_size:
        raise ValueError(f"sentencepiece trained {n} pieces, more than text_vocab_size={text_vocab_size}")
    # Repeated protobuf fields may be appended after the other fields: these become the last ids.
    lowest = min(sp.get_score(i) for i in range(n))
    model += b"".join(_pb_piece(p, lowest - 1.0) for p in _fillers(text_vocab_size - n))
    sp = spm.SentencePieceProcessor(model_proto=model)
    assert sp.get_piece_size() == text_vocab_size and sp.id_to_piece(3) == "<0x00>" and sp.bos_id() == 1
    (out / "tokenizer.model").write_bytes(model)
    (out / "added_tokens.json").write_text(json.dumps({IMAGE_TOKEN: text_vocab_size, PAD_TOKEN: text_vocab_size + 1}))


def write_tokenizer(out_dir, text_vocab_size: int, kind: str = "json", seed: int = 0,
                    corpus: list[str] | None = None) -> dict:
    """Write a deterministic LLaMA-like tokenizer (tokenizer.json or tokenizer.model) into out_dir.

    `corpus` (tokenizer.json only): lines to learn the merges from instead of the built-in text.
    """
    if corpus is not None and kind != "json":
        raise ValueError("a custom corpus is supported for the tokenizer.json kind only")
    if kind not in ("json", "sentencepiece"):
        raise ValueError(f"tokenizer kind must be 'json' or 'sentencepiece', got {kind!r}")
    if not isinstance(text_vocab_size, int) or not NUM_BASE + 1 <= text_vocab_size <= 99_999:
        raise ValueError(f"text_vocab_size must be an int in [{NUM_BASE + 1}, 99999], got {text_vocab_size!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "json":
        _write_json(out, text_vocab_size, seed, corpus)
    else:
        _write_sentencepiece(out, text_vocab_size, seed)
    # legacy=True: every text chunk between special tokens gets its own "▁" prefix, which is how
    # LLaVA-1.5 saw "<image>\n" in training (29871, 13 after the image token).
    _write_side_files(out, text_vocab_size, legacy=True)
    return {"bos_token_id": 1, "eos_token_id": 2, "image_token_id": text_vocab_size,
            "pad_token_id": text_vocab_size + 1, "text_vocab_size": text_vocab_size}


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    print(write_tokenizer(args[0], int(args[1]) if len(args) > 1 else 32000, args[2] if len(args) > 2 else "json"))
