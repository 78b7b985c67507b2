"""A base model's tokens as a guide with ANOTHER tokenizer reads them: their bytes.

A guide with its own tokenizer cannot score a base candidate by id. It scores the candidate's
text: the bytes the base token stands for, written in the guide's tokens. Both tokenizers
must be byte-level BPE (GPT-2's byte alphabet: SmolLM2, Qwen2, Llama 3, GPT-NeoX, ...), so
every base token has exact bytes, an incomplete UTF-8 character included, and every byte
string has guide tokens. Other tokenizers (SentencePiece with ``▁`` and byte fallback) are
refused by name.

Where this is exact and where it is not:

- Each base token's bytes are written in guide tokens ON THEIR OWN (the guide's normalizer
  and pre-tokenizer, then its BPE; raw BPE over the bytes where they end inside a UTF-8
  character). The guide therefore reads the committed text cut at the base's token
  boundaries: with the SAME tokenizer on both sides this gives back the base's own ids
  (every regular token of SmolLM2's and Qwen2.5's vocabularies round-trips; a test checks),
  so the cross-tokenizer path scores exactly what the same-tokenizer path scores.
- With another tokenizer it is an approximation: a word the base wrote as two tokens
  (``Hel`` + ``lo``) reaches the guide as the guide's tokens of each piece, not as the
  guide's own token for ``Hello``, and a character split across base tokens reaches it as
  bytes. Nothing is ever re-encoded, so nothing the guide has read becomes unstable.
- A base end-of-sequence token is the guide's end of turn (scored as any of its end ids,
  read as the first); any other special or added token is read as its written form
  (``<|im_start|>``) in the guide's tokens, an approximation for tokens a response rarely
  holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from tokenizers import decoders, models

from padlm.errors import PadlmError

# the segment of a base end-of-sequence token: the guide's end of turn (no guide id is -1)
END = (-1,)


@lru_cache(maxsize=1)
def _byte_alphabet() -> tuple[dict[int, str], dict[str, int]]:
    """GPT-2's reversible map between the 256 byte values and printable characters, which
    byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    to_char = {byte: chr(code) for byte, code in zip(printable, codes, strict=True)}
    return to_char, {char: byte for byte, char in to_char.items()}


def check_byte_level(tokenizer, name: str) -> None:
    """Refuse a tokenizer whose tokens are not byte-level BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.model, models.BPE) or not isinstance(
            backend.decoder, decoders.ByteLevel):
        kind = type(backend.model).__name__ if backend is not None else type(tokenizer).__name__
        raise PadlmError(f"{name}'s tokenizer ({kind}) is not byte-level BPE: a guide with "
                         "its own tokenizer reads the base's tokens as bytes, which needs "
                         "byte-level BPE on both sides", param="persrm")


class ByteLevelText:
    """One byte-level BPE tokenizer's view of bytes: what a token is, how bytes are written."""

    def __init__(self, tokenizer, name: str) -> None:
        check_byte_level(tokenizer, name)
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer
        self.special = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)

    def token_bytes(self, token: int) -> bytes:
        """The bytes ``token`` stands for (a special or added token: its written form)."""
        piece = self.backend.id_to_token(token)
        if piece is None:
            raise PadlmError(f"token id {token} is outside the tokenizer's vocabulary")
        if token in self.special:
            return piece.encode()
        to_byte = _byte_alphabet()[1]
        return bytes(to_byte[char] for char in piece)

    def encode(self, data: bytes) -> tuple[int, ...]:
        """``data`` in this tokenizer's tokens, read on its own: valid UTF-8 goes through the
        normalizer and pre-tokenizer as any text would; bytes ending inside a character go
        straight to the BPE model (one piece, in the byte alphabet)."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return self._bpe("".join(_byte_alphabet()[0][byte] for byte in data))
        if self.backend.normalizer is not None:
            text = self.backend.normalizer.normalize_str(text)
        pieces = ([piece for piece, _ in self.backend.pre_tokenizer.pre_tokenize_str(text)]
                  if self.backend.pre_tokenizer is not None else [text])
        return tuple(token for piece in pieces for token in self._bpe(piece))

    def _bpe(self, piece: str) -> tuple[int, ...]:
        return tuple(token.id for token in self.backend.model.tokenize(piece))


class Transducer:
    """Base token ids -> the guide token ids that write the same bytes (cached per id: the
    decode loop asks for the same few thousand ids over and over)."""

    def __init__(self, base_tokenizer, guide_tokenizer, base_eos: Sequence[int],
                 base_name: str, guide_name: str) -> None:
        self.base = ByteLevelText(base_tokenizer, base_name)
        self.guide = ByteLevelText(guide_tokenizer, guide_name)
        self.base_eos = frozenset(base_eos)
        self._segments: dict[int, tuple[int, ...]] = {}

    def segment(self, token: int) -> tuple[int, ...]:
        """The guide's ids for base ``token`` (at least one), or :data:`END` for an end of
        sequence."""
        if token not in self._segments:
            segment = END if token in self.base_eos else self.guide.encode(
                self.base.token_bytes(token))
            if not segment:
                raise PadlmError(f"base token {token} writes no guide tokens")
            self._segments[token] = segment
        return self._segments[token]

    def segments(self, tokens: Sequence[int]) -> list[tuple[int, ...]]:
        return [self.segment(token) for token in tokens]
