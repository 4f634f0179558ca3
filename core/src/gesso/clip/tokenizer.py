"""gesso's CLIP tokenizer: byte-level BPE over the published ``vocab.json`` / ``merges.txt`` files.

It gives the ids transformers' ``CLIPTokenizer`` gives, without importing transformers or tokenizers
(seconds per process). The steps, in the order the reference applies them:

1. special ("added") tokens are cut out of the raw text; those marked ``normalized`` are looked for
   only after step 2, so ``<|ENDOFTEXT|>`` is special only when its token is normalized;
2. each remaining piece is normalized: NFC, every run of Unicode white space becomes one space,
   then lowercase character by character (no final-sigma rule: ``Σ`` is always ``σ``);
3. it is split into words: the literal ``<|startoftext|>`` / ``<|endoftext|>`` (themselves split as
   ``<|``, the name, ``|>``), the contractions ``'s 't 're 've 'm 'll 'd``, runs of letters, single
   digits, runs of anything else but space; spaces go;
4. each word's UTF-8 bytes are spelt with GPT-2's 256 printable byte symbols, the last one carrying
   ``</w>``, and merged by rank (lowest first, leftmost among equals);
5. ``bos`` and ``eos`` wrap the ids; truncation keeps them, padding goes on the right.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gesso.clip import Batch
from gesso.configuration import read_json_object

__all__ = ["AddedToken", "BatchEncoding", "CLIPTokenizer", "TokenizerFileError"]

#: What the reference stores as ``model_max_length`` when a tokenizer has no limit.
VERY_LARGE_INTEGER = int(1e30)
#: Above this a ``model_max_length`` means "no limit" (no padding or truncation to it).
_LARGE_INTEGER = int(1e20)

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_CLIP_DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
_END_OF_WORD = "</w>"
_SPECIAL_WORDS = ("<|startoftext|>", "<|endoftext|>")
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")
_CACHE_LIMIT = 10_000

# Unicode's White_Space property (what ``\s`` means in the reference's regex engine); Python's
# ``str.isspace`` also counts U+001C..U+001F, which the reference keeps as punctuation.
_WHITE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_WHITE_SPACE_SET = frozenset(_WHITE_SPACE)
_WHITE_SPACE_RUN = re.compile("[" + re.escape(_WHITE_SPACE) + "]+")
# Step 3 for ASCII text (after normalization: lowercase, the only space is " ").
_ASCII_WORDS = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'(?:s|t|re|ve|m|ll|d)|[a-z]+|[0-9]|[^ a-z0-9]+")


class TokenizerFileError(ValueError):
    """A tokenizer file is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class AddedToken:
    """A token matched as a whole in the text before BPE (the reference's ``AddedToken``).

    ``normalized`` tokens are matched after lowercasing and white-space folding, the others on the
    raw text; ``lstrip``/``rstrip`` swallow the white space beside a match; ``single_word`` matches
    only outside words. ``special`` tokens are dropped by ``skip_special_tokens``.
    """

    content: str
    single_word: bool = False
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = True
    special: bool = False

    @classmethod
    def from_json(cls, value: dict[str, Any], special: bool | None = None) -> AddedToken:
        """From a serialised token; ``normalized`` defaults to ``not special`` as in the reference."""
        fields = {k: v for k, v in value.items() if k in ("content", "single_word", "lstrip", "rstrip", "normalized", "special")}
        if not isinstance(fields.get("content"), str):
            raise ValueError(f"token {value!r} has no string 'content'")
        if special is not None:
            fields["special"] = special
        fields.setdefault("special", False)
        if fields.get("normalized") is None:
            fields["normalized"] = not fields["special"]
        return cls(**{k: (v if k == "content" else bool(v)) for k, v in fields.items()})

    def to_json(self, with_special: bool = True) -> dict[str, Any]:
        data = {
            "content": self.content,
            "lstrip": self.lstrip,
            "normalized": self.normalized,
            "rstrip": self.rstrip,
            "single_word": self.single_word,
        }
        if with_special:
            data["special"] = self.special
        return data

    def __str__(self) -> str:
        return self.content


class BatchEncoding(Batch):
    """``input_ids`` (and ``attention_mask``) by key or attribute, as the reference returns them."""

    def to(self, device: Any) -> BatchEncoding:
        """Tensors moved to ``device`` (lists are left as they are)."""
        return self._mapped(lambda value: value.to(device))


def _byte_symbols() -> list[str]:
    """GPT-2's table: byte ``b`` is spelt ``symbols[b]``, a printable character, so BPE never sees
    white space or control characters. Printable Latin-1 bytes stand for themselves; the other 68
    take the code points from U+0100 on, in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    symbols, extra = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(0x100 + extra))
            extra += 1
    return symbols


#: ``BYTE_SYMBOLS[b]`` spells byte ``b`` in vocabularies (``gesso.tiny`` writes its test vocabulary with it).
BYTE_SYMBOLS = _byte_symbols()
_LATIN1_TO_SYMBOL = {b: s for b, s in enumerate(BYTE_SYMBOLS)}  # for str.translate of latin-1 text
_SYMBOL_TO_BYTE = {s: b for b, s in enumerate(BYTE_SYMBOLS)}


def normalize(text: str) -> str:
    """Step 2: NFC, white-space runs to one space, per-character lowercase."""
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    text = _WHITE_SPACE_RUN.sub(" ", text)
    if "Σ" in text:  # str.lower would apply the final-sigma rule; the reference maps each char alone
        return "".join(c.lower() for c in text)
    return text.lower()


def _char_class(c: str) -> str:
    """``L`` letter, ``N`` number, `` `` space, ``P`` anything else (by Unicode general category)."""
    if c in _WHITE_SPACE_SET:
        return " "
    kind = unicodedata.category(c)[0]
    return kind if kind in "LN" else "P"


def pre_tokenize(text: str) -> list[str]:
    """Step 3 on normalized text: the words BPE sees, before byte spelling."""
    words: list[str] = []
    if text.isascii():
        for match in _ASCII_WORDS.finditer(text):
            word = match.group()
            words.extend(_split_special_word(word) if word in _SPECIAL_WORDS else (word,))
        return words
    i, n = 0, len(text)
    classes = [_char_class(c) for c in text]
    while i < n:
        kind = classes[i]
        if kind == " ":
            i += 1
            continue
        if text[i] == "<":
            special = next((w for w in _SPECIAL_WORDS if text.startswith(w, i)), None)
            if special:
                words.extend(_split_special_word(special))
                i += len(special)
                continue
        if text[i] == "'":
            suffix = next((s for s in _CONTRACTIONS if text.startswith(s, i + 1)), None)
            if suffix:
                words.append("'" + suffix)
                i += 1 + len(suffix)
                continue
        j = i + 1
        if kind != "N":  # digits stand alone; letters and punctuation run on
            while j < n and classes[j] == kind:
                j += 1
        words.append(text[i:j])
        i = j
    return words


def _split_special_word(word: str) -> tuple[str, str, str]:
    """The byte-level stage splits a literal ``<|name|>`` that was not a special token in three."""
    return "<|", word[2:-2], "|>"


def _spell_bytes(word: str) -> str:
    return word.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_SYMBOL)


def _token_bytes(token: str) -> bytes:
    """A token's bytes: through the byte table if every character is in it, else its own UTF-8."""
    try:
        return bytes(_SYMBOL_TO_BYTE[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def _to_list(value: Any) -> Any:
    """Tensors and arrays to (nested) Python lists of ints."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, tuple):
        return [_to_list(v) for v in value]
    if isinstance(value, list) and value and not isinstance(value[0], int):
        return [_to_list(v) for v in value]
    return value


class CLIPTokenizer:
    """CLIP's tokenizer, reading and writing the published layout; the reference's call signature.

    Build it with :meth:`from_pretrained` (a folder, or a Hub repository with ``subfolder``).
    """

    #: Pipelines save it as transformers' ``CLIPTokenizer``, which reads the same files.
    model_index_library = "transformers"
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"
    truncation_side = "right"

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        model_max_length: int = VERY_LARGE_INTEGER,
        bos_token: str | AddedToken | None = "<|startoftext|>",
        eos_token: str | AddedToken | None = "<|endoftext|>",
        unk_token: str | AddedToken | None = "<|endoftext|>",
        pad_token: str | AddedToken | None = "<|endoftext|>",
        added_tokens: Iterable[AddedToken] = (),
        extra_special_tokens: Iterable[str | AddedToken] = (),
        padding_side: str = "right",
        truncation_side: str = "right",
        split_special_tokens: bool = False,
        config: dict[str, Any] | None = None,
        source: str = "",
        **special_tokens: str | AddedToken | None,
    ) -> None:
        """``added_tokens`` are the serialised ``added_tokens_decoder`` entries, in id order;
        ``special_tokens`` takes ``sep_token``/``cls_token``/``mask_token``. ``config`` keeps the
        unrecognised ``tokenizer_config.json`` keys for :meth:`save_pretrained`; ``source`` names
        the file the merges come from in error messages."""
        unknown = set(special_tokens) - set(_SPECIAL_KEYS)
        if unknown:
            raise TypeError(f"unexpected arguments {sorted(unknown)}")
        if padding_side not in ("right", "left") or truncation_side not in ("right", "left"):
            raise ValueError("padding_side and truncation_side are 'right' or 'left'")
        self._source = source or "CLIPTokenizer"
        self._vocab = dict(vocab)
        self._vocab_r_cache: dict[int, str] | None = None
        self._merges = [(left, right) for left, right in merges]
        # (left id, right id) -> (rank, merged id); a pair listed twice keeps its last rank, as in
        # the reference. Built with comprehensions: CLIP has ~49k merges, loaded per process.
        get = self._vocab.get
        lefts, rights = [get(a) for a, _ in self._merges], [get(b) for _, b in self._merges]
        merged = [get(a + b) for a, b in self._merges]
        if None in lefts or None in rights or None in merged:
            rank = next(i for i, ids in enumerate(zip(lefts, rights, merged)) if None in ids)
            left, right = self._merges[rank]
            raise TokenizerFileError(f"{self._source}: merge {rank + 1} ({left} {right}) uses a symbol that is not in the vocabulary")
        self._merge_ranks: dict[tuple[int, int], tuple[int, int]] = dict(zip(zip(lefts, rights), zip(range(len(merged)), merged)))  # type: ignore[arg-type]
        self.model_max_length = int(model_max_length)
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.split_special_tokens = split_special_tokens
        self._config = dict(config or {})
        self._named: dict[str, str | AddedToken | None] = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "unk_token": unk_token,
            "pad_token": pad_token,
            **{k: special_tokens.get(k) for k in ("sep_token", "cls_token", "mask_token")},
        }
        self._extra = list(extra_special_tokens)
        self._register_added_tokens(list(added_tokens))
        self._cache: dict[str, tuple[int, ...]] = {}

    # ----------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike[str], subfolder: str | None = None, **hub_options: Any
    ) -> CLIPTokenizer:
        """Read a tokenizer folder as transformers does: ``tokenizer.json`` when present, else
        ``vocab.json`` + ``merges.txt``; special tokens from ``tokenizer_config.json``,
        ``special_tokens_map.json``, ``added_tokens.json``. ``hub_options`` are ``cache_dir``,
        ``revision``, ``local_files_only`` and ``token``."""
        from gesso.loading import resolve_component_folder

        folder = resolve_component_folder(pretrained_model_name_or_path, subfolder, **hub_options)
        with _gc_paused():
            return cls._from_folder(Path(folder))

    @classmethod
    def _from_folder(cls, folder: Path) -> CLIPTokenizer:
        config = read_json_object(folder / "tokenizer_config.json", TokenizerFileError, required=False) or {}
        fast_file = folder / "tokenizer.json"
        fast = read_json_object(fast_file, TokenizerFileError, required=True) if fast_file.is_file() else None
        if fast is not None:
            vocab, merges = _vocab_and_merges_from_fast(fast, fast_file)
        else:
            vocab = _read_vocab(folder / "vocab.json")
            merges = _read_merges(folder / "merges.txt")

        named: dict[str, Any] = {}
        for key in _SPECIAL_KEYS:
            if key in config:
                named[key] = _token_from_config(config[key], folder / "tokenizer_config.json", key)
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra, dict):  # named model-specific tokens: only their texts matter here
            extra = list(extra.values())

        decoder: dict[int, AddedToken] = {}
        if "added_tokens_decoder" in config:
            entries = config["added_tokens_decoder"]
            if not isinstance(entries, dict):
                raise TokenizerFileError(f"{folder / 'tokenizer_config.json'}: added_tokens_decoder is not an object")
            for index, entry in entries.items():
                decoder[int(index)] = _parse_token(entry, folder / "tokenizer_config.json", f"added_tokens_decoder[{index}]")
        else:
            # The older layout: special_tokens_map.json overrides the config, then added_tokens.json
            # and tokenizer.json's list name extra tokens.
            map_file = folder / "special_tokens_map.json"
            special_map = read_json_object(map_file, TokenizerFileError, required=False) or {}
            for key, value in special_map.items():
                if key in _SPECIAL_KEYS:
                    named[key] = (
                        AddedToken.from_json(_check_token_dict(value, map_file, key), special=True) if isinstance(value, dict) else value
                    )
                elif key in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, list):
                    for item in value:
                        token = (
                            AddedToken.from_json(_check_token_dict(item, map_file, key), special=True) if isinstance(item, dict) else item
                        )
                        if token not in extra:
                            extra = [*extra, token]
            added_file = folder / "added_tokens.json"
            added = read_json_object(added_file, TokenizerFileError, required=False) or {}
            specials = {str(named[k]) for k in _SPECIAL_KEYS if named.get(k)} | {str(t) for t in extra}
            for content, index in added.items():
                is_special = content in specials
                decoder[int(index)] = AddedToken(content, normalized=not is_special, special=is_special)
            for entry in (fast or {}).get("added_tokens", []):
                decoder[int(entry.get("id", -1))] = _parse_token(entry, fast_file, "added_tokens")
        for key, default in _CLIP_DEFAULTS.items():
            named.setdefault(key, default)
        by_content = {t.content: t for t in decoder.values()}
        if by_content:  # a named token given as a plain string takes the flags its entry records
            named = {k: by_content.get(str(v), v) if v is not None else None for k, v in named.items()}
        for key, value in named.items():
            if value is not None and not isinstance(value, str | AddedToken):
                raise TokenizerFileError(f"{folder}: {key} is neither a string nor a token object")

        max_length = config.get("model_max_length", config.get("max_len"))
        if max_length is not None and not isinstance(max_length, int | float):
            raise TokenizerFileError(f"{folder / 'tokenizer_config.json'}: model_max_length is not a number")
        kept = {k: v for k, v in config.items() if k not in (*_SPECIAL_KEYS, "added_tokens_decoder")}
        return cls(
            vocab,
            merges,
            model_max_length=VERY_LARGE_INTEGER if max_length is None else int(max_length),
            added_tokens=[decoder[i] for i in sorted(decoder)],
            extra_special_tokens=[_token_from_config(t, folder / "tokenizer_config.json", "extra_special_tokens") for t in extra],
            padding_side=config.get("padding_side") or "right",
            truncation_side=config.get("truncation_side") or "right",
            split_special_tokens=bool(config.get("split_special_tokens", False)),
            config=kept,
            source=str(fast_file if fast is not None else folder / "merges.txt"),
            **named,
        )

    def _register_added_tokens(self, decoder_tokens: list[AddedToken]) -> None:
        """Give every added token its id and final flags as the reference does: the recorded tokens
        in id order, then each named special token and extra one not among them (a plain string
        becoming a special, un-normalized token); a later token with the same text replaces the
        earlier one's flags, so SD 1.5's ``pad_token: "<|endoftext|>"`` makes eos un-normalized."""
        named_texts = {str(v) for v in self._named.values() if v is not None}
        recorded = {t.content for t in decoder_tokens}
        sequence = list(decoder_tokens)
        for value in [*(v for v in self._named.values() if v is not None), *self._extra]:
            if str(value) not in recorded:
                sequence.append(AddedToken(value, normalized=False, special=True) if isinstance(value, str) else value)
        self._added: dict[str, AddedToken] = {}
        self._added_ids: dict[str, int] = {}
        self._special_texts: set[str] = set()
        for token in sequence:
            if not token.special and token.content in named_texts:
                token = replace(token, special=True)
            if not token.content:
                continue
            if token.content not in self._added_ids:
                self._added_ids[token.content] = self._next_added_id(token.content)
            self._added[token.content] = token
            if token.special:
                self._special_texts.add(token.content)
        # The reference spells a normalized added token by its normalized text when decoding.
        self._added_by_id = {i: normalize(t) if self._added[t].normalized else t for t, i in self._added_ids.items()}
        # Normalized tokens are looked for in normalized text, so in their normalized spelling.
        self._raw_patterns = [(t.content, t) for t in self._added.values() if not t.normalized]
        self._normalized_patterns = [(normalize(t.content), t) for t in self._added.values() if t.normalized]

    def _next_added_id(self, content: str) -> int:
        if content in self._vocab:
            return self._vocab[content]
        size = len(self._vocab)
        if not self._added_ids:
            return size
        highest = max(self._added_ids.values())
        return highest + 1 if highest >= size or size == 0 else size

    # ---------------------------------------------------------------------------------- properties

    def _named_text(self, key: str) -> str | None:
        value = self._named.get(key)
        return None if value is None else str(value)

    @property
    def bos_token(self) -> str | None:
        return self._named_text("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._named_text("eos_token")

    @property
    def unk_token(self) -> str | None:
        return self._named_text("unk_token")

    @property
    def pad_token(self) -> str | None:
        return self._named_text("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of_named("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of_named("eos_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._id_of_named("unk_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of_named("pad_token")

    def _id_of_named(self, key: str) -> int | None:
        text = self._named_text(key)
        return None if text is None else self.convert_tokens_to_ids(text)

    @property
    def all_special_tokens(self) -> list[str]:
        texts = [str(v) for v in [*self._named.values(), *self._extra] if v is not None]
        return list(dict.fromkeys(texts))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.convert_tokens_to_ids(t) for t in self.all_special_tokens]

    @property
    def vocab_size(self) -> int:
        """Entries of the BPE vocabulary, without tokens added beside it."""
        return len(self._vocab)

    def __len__(self) -> int:
        return len(self._vocab.keys() | self._added_ids.keys())

    def get_vocab(self) -> dict[str, int]:
        return {**self._vocab, **self._added_ids}

    def __repr__(self) -> str:
        return f"CLIPTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, pad_token={self.pad_token!r})"

    # ------------------------------------------------------------------------------------ encoding

    def _text_ids(self, text: str) -> list[int]:
        """Ids of ``text`` without bos/eos (steps 1-4)."""
        ids: list[int] = []
        for raw, raw_id in self._split_added(text, self._raw_patterns):
            if raw_id is not None:
                ids.append(raw_id)
                continue
            for piece, piece_id in self._split_added(normalize(raw), self._normalized_patterns):
                if piece_id is not None:
                    ids.append(piece_id)
                    continue
                for word in pre_tokenize(piece):
                    ids.extend(self._bpe(_spell_bytes(word)))
        return ids

    def _split_added(self, text: str, patterns: list[tuple[str, AddedToken]]) -> list[tuple[str, int | None]]:
        """Cut ``patterns`` out of ``text``: the leftmost match, the longest among those starting
        there, searching on after each match; pieces of text come with ``None``."""
        if not patterns or not text:
            return [(text, None)]
        out: list[tuple[str, int | None]] = []
        position = done = 0
        n = len(text)
        while True:
            best: tuple[int, int, AddedToken] | None = None
            for pattern, token in patterns:
                at = text.find(pattern, position) if pattern else -1
                if at >= 0 and (best is None or at < best[0] or (at == best[0] and len(pattern) > best[1])):
                    best = (at, len(pattern), token)
            if best is None:
                break
            start, stop, token = best[0], best[0] + best[1], best[2]
            position = stop
            if self.split_special_tokens and token.content in self._special_texts:
                continue
            if token.single_word and ((start > 0 and _is_word_char(text[start - 1])) or (stop < n and _is_word_char(text[stop]))):
                continue
            if token.lstrip:
                left = start
                while left > 0 and text[left - 1] in _WHITE_SPACE_SET:
                    left -= 1
                start = max(left, done)
            if token.rstrip:
                while stop < n and text[stop] in _WHITE_SPACE_SET:
                    stop += 1
            if done < start:
                out.append((text[done:start], None))
            out.append(("", self._added_ids[token.content]))
            done = stop
        if done < n:
            out.append((text[done:], None))
        return out

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Step 4 for one byte-spelt word: merge the adjacent pair of lowest rank (leftmost among
        equals) until no pair has a rank; a heap of candidate pairs keeps long words cheap."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        vocab = self._vocab
        last = len(word) - 1
        ids = []
        for i, symbol in enumerate(word):
            found = vocab.get(symbol + _END_OF_WORD if i == last else symbol)
            ids.append(self._unk_model_id() if found is None else found)
        n = len(ids)
        ranks = self._merge_ranks
        alive = [True] * n
        prev = list(range(-1, n - 1))
        nxt = [*range(1, n), -1]
        heap = []
        for i in range(n - 1):
            merge = ranks.get((ids[i], ids[i + 1]))
            if merge is not None:
                heap.append((merge[0], i, merge[1]))
        heapq.heapify(heap)
        while heap:
            _, pos, new_id = heapq.heappop(heap)
            right = nxt[pos]
            if not alive[pos] or right < 0:
                continue
            current = ranks.get((ids[pos], ids[right]))
            if current is None or current[1] != new_id:  # stale: a neighbour merged since
                continue
            ids[pos] = new_id
            alive[right] = False
            after = nxt[pos] = nxt[right]
            if after >= 0:
                prev[after] = pos
            before = prev[pos]
            if before >= 0 and (merge := ranks.get((ids[before], new_id))) is not None:
                heapq.heappush(heap, (merge[0], before, merge[1]))
            if after >= 0 and (merge := ranks.get((new_id, ids[after]))) is not None:
                heapq.heappush(heap, (merge[0], pos, merge[1]))
        result = tuple(i for i, keep in zip(ids, alive) if keep)
        if len(self._cache) < _CACHE_LIMIT:
            self._cache[word] = result
        return result

    def _unk_model_id(self) -> int:
        unk = self.unk_token
        if unk is None or unk not in self._vocab:
            raise ValueError(f"{self._source}: the vocabulary lacks a byte symbol and the unknown token {unk!r}")
        return self._vocab[unk]

    def tokenize(self, text: str) -> list[str]:
        """The tokens of ``text``, without bos/eos."""
        return self.convert_ids_to_tokens(self._text_ids(text))

    def __call__(
        self,
        text: str | Sequence[str],
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool | None = None,
        add_special_tokens: bool = True,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        verbose: bool = True,
    ) -> BatchEncoding:
        """Encode one text (flat lists) or a batch (lists of lists, or ``(B, L)`` tensors with
        ``return_tensors="pt"``/``"np"``). ``padding``: ``False``/``"do_not_pad"``, ``True``/``"longest"``,
        ``"max_length"``; ``truncation``: ``True``/``"longest_first"``/``"only_first"``;
        a bare ``max_length`` truncates, and ``max_length=None`` means ``model_max_length``.
        Options of the reference this does not have (overflow, offsets, pairs) raise ``TypeError``."""
        if isinstance(text, str):
            texts, batched = [text], False
        elif isinstance(text, list | tuple) and all(isinstance(t, str) for t in text):
            texts, batched = list(text), True
        else:
            raise ValueError("text must be a string or a list of strings")
        pad_mode, truncate, max_length = self._strategies(padding, truncation, max_length)
        sequences = [self._with_special_tokens(self._text_ids(t), add_special_tokens, truncate, max_length) for t in texts]
        masks = [[1] * len(s) for s in sequences]
        if pad_mode != "none" and sequences:
            target = max(len(s) for s in sequences) if pad_mode == "longest" else max_length
            assert target is not None
            if pad_to_multiple_of and target % pad_to_multiple_of:
                target += pad_to_multiple_of - target % pad_to_multiple_of
            pad_id = self.pad_token_id
            assert pad_id is not None
            side = padding_side or self.padding_side
            for i, seq in enumerate(sequences):
                missing = target - len(seq)
                if missing > 0:
                    if side == "right":
                        sequences[i], masks[i] = seq + [pad_id] * missing, masks[i] + [0] * missing
                    else:
                        sequences[i], masks[i] = [pad_id] * missing + seq, [0] * missing + masks[i]
        data: dict[str, Any] = {"input_ids": sequences}
        if return_attention_mask is not False:
            data["attention_mask"] = masks
        if return_tensors is not None:
            return BatchEncoding({k: _as_tensor(v, return_tensors) for k, v in data.items()})
        if not batched:
            data = {k: v[0] for k, v in data.items()}
        return BatchEncoding(data)

    def encode(self, text: str, add_special_tokens: bool = True, **options: Any) -> Any:
        """The ids of one text (``__call__``'s options apply)."""
        return self(text, add_special_tokens=add_special_tokens, **options)["input_ids"]

    def _strategies(self, padding: bool | str, truncation: bool | str | None, max_length: int | None) -> tuple[str, bool, int | None]:
        """The reference's rules: ``(pad mode, truncate?, length)``; a ``model_max_length`` past
        1e20 means none, so padding or truncating "to it" is off."""
        if max_length is not None and padding is False and truncation is None:
            truncation = True
        pad_modes = {False: "none", "do_not_pad": "none", True: "longest", "longest": "longest", "max_length": "max_length"}
        if padding not in pad_modes:
            raise ValueError(f"padding must be one of {sorted(map(str, pad_modes))}, not {padding!r}")
        pad_mode = pad_modes[padding]  # type: ignore[index]
        if truncation in (None, False, "do_not_truncate"):
            truncate = False
        elif truncation in (True, "longest_first", "only_first"):
            truncate = True
        else:
            raise ValueError(f"truncation must be True, False, 'longest_first', 'only_first' or 'do_not_truncate', not {truncation!r}")
        if max_length is None:
            unlimited = self.model_max_length > _LARGE_INTEGER
            if pad_mode == "max_length":
                pad_mode = "none" if unlimited else pad_mode
                max_length = None if unlimited else self.model_max_length
            if truncate:
                truncate = not unlimited
                max_length = None if unlimited else self.model_max_length
        if pad_mode != "none" and self.pad_token_id is None:
            raise ValueError("Asking to pad but the tokenizer does not have a padding token")
        return pad_mode, truncate, max_length

    def _with_special_tokens(self, ids: list[int], add_special_tokens: bool, truncate: bool, max_length: int | None) -> list[int]:
        """Truncate (keeping bos/eos) then wrap. A ``max_length`` below 2 does not truncate text that
        gets bos and eos, as in the reference."""
        added = 2 if add_special_tokens else 0
        if truncate and max_length is not None and max_length >= added:
            keep = max_length - added
            if len(ids) > keep:
                ids = ids[:keep] if self.truncation_side == "right" else ids[len(ids) - keep :]
        if not add_special_tokens:
            return ids
        bos, eos = self.bos_token_id, self.eos_token_id
        if bos is None or eos is None:
            raise ValueError(f"{self._source}: adding special tokens needs a bos and an eos token")
        return [bos, *ids, eos]

    # ------------------------------------------------------------------------------------ decoding

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> Any:
        """Token strings (``None`` for an id no token has)."""
        ids = _to_list(ids)
        if isinstance(ids, int):
            return self._id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._id_to_token(int(i)) for i in ids if int(i) not in skip]

    def _id_to_token(self, index: int) -> str | None:
        token = self._added_by_id.get(index)
        if token is not None:
            return token
        if self._vocab_r_cache is None:  # built on first use: encoding never needs it
            self._vocab_r_cache = {i: t for t, i in self._vocab.items()}
        return self._vocab_r_cache.get(index)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> Any:
        """Ids of token strings; a string that is no token gives the unknown token's id."""
        if isinstance(tokens, str):
            found = self._added_ids.get(tokens, self._vocab.get(tokens))
            if found is None:
                unk = self.unk_token
                return None if unk is None or unk == tokens else self.convert_tokens_to_ids(unk)
            return found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def decode(self, token_ids: Any, skip_special_tokens: bool = False, **unused: Any) -> Any:
        """Text of one sequence (a list of sequences gives a list of texts, as in the reference).

        Token bytes are joined and read as UTF-8 (bad bytes become U+FFFD), every ``</w>`` becomes
        a space and the ends are stripped. The reference's ``clean_up_tokenization_spaces`` is
        ignored for BPE tokenizers such as this one, so it is here too.
        """
        ids = _to_list(token_ids)
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], list):
            return [self._decode_one(seq, skip_special_tokens) for seq in ids]
        return self._decode_one(ids, skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, **unused: Any) -> list[str]:
        """Texts of a batch of sequences (a ``(B, L)`` tensor or a list of lists)."""
        rows = _to_list(sequences)
        if not rows:
            return []
        if isinstance(rows[0], int):
            return [self._decode_one(rows, skip_special_tokens)]
        return [self._decode_one(row, skip_special_tokens) for row in rows]

    def _decode_one(self, ids: list[int], skip_special_tokens: bool) -> str:
        data = bytearray()
        for index in ids:
            token = self._id_to_token(int(index))
            if token is None or (skip_special_tokens and token in self._special_texts):
                continue
            data += _token_bytes(token)
        return data.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ").strip()

    # -------------------------------------------------------------------------------------- saving

    def save_pretrained(self, save_directory: str | os.PathLike[str], **unused: Any) -> tuple[str, ...]:
        """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` (its ``added_tokens_decoder``
        records every added token's flags) and ``special_tokens_map.json``, which transformers and
        :meth:`from_pretrained` read back to the same tokenizer."""
        from gesso.output import write_atomic  # imports PIL: only when saving

        def write(path: Path, text: str) -> None:
            write_atomic(text.encode("utf-8"), path)

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
        config_file, map_file = folder / "tokenizer_config.json", folder / "special_tokens_map.json"
        write(vocab_file, json.dumps(self._vocab, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        write(merges_file, "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self._merges))
        config = {
            k: v for k, v in self._config.items() if k not in ("special_tokens_map_file", "tokenizer_file", "name_or_path", "auto_map")
        }
        config.update(
            tokenizer_class="CLIPTokenizer",
            model_max_length=self.model_max_length,
            added_tokens_decoder={
                str(self._added_ids[t]): self._added[t].to_json() for t in sorted(self._added, key=self._added_ids.__getitem__)
            },
            **{k: str(v) for k, v in self._named.items() if v is not None},
        )
        if self._extra:
            config["extra_special_tokens"] = [str(t) for t in self._extra]
        if self.padding_side != "right":
            config["padding_side"] = self.padding_side
        if self.truncation_side != "right":
            config["truncation_side"] = self.truncation_side
        write(config_file, json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        special_map: dict[str, Any] = {k: self._added[str(v)].to_json(with_special=False) for k, v in self._named.items() if v is not None}
        if self._extra:
            special_map["additional_special_tokens"] = [str(t) for t in self._extra]  # objects here trip transformers 5
        write(map_file, json.dumps(special_map, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        return tuple(str(p) for p in (config_file, map_file, vocab_file, merges_file))


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Loading makes ~100k small objects that hold no cycles; pausing the cyclic collector
    meanwhile saves it dozens of useless passes (about a third of the load time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _is_word_char(c: str) -> bool:
    """``\\w`` of the reference's regex engine: letters (and the circled ones), marks, decimal and
    letter numbers, connector punctuation, the zero-width joiners. ``²`` or ``½`` are not."""
    kind = unicodedata.category(c)
    return kind[0] in "LM" or kind in ("Nd", "Nl", "Pc") or c in "\u200c\u200d" or "\u24b6" <= c <= "\u24e9"


def _as_tensor(rows: list[list[int]], kind: str) -> Any:
    if len({len(r) for r in rows}) > 1:
        raise ValueError(
            "Unable to create tensor: the sequences have different lengths; use padding=True or padding='max_length' (with truncation=True)"
        )
    if kind == "pt":
        import torch

        return torch.tensor(rows, dtype=torch.long)
    if kind == "np":
        import numpy as np

        return np.array(rows, dtype=np.int64)
    raise ValueError(f"return_tensors must be 'pt', 'np' or None, not {kind!r}")


# ------------------------------------------------------------------------------------ file reading


def _read_vocab(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise TokenizerFileError(f"{path.parent}: has neither vocab.json nor tokenizer.json, so it is no CLIP tokenizer folder")
    data = read_json_object(path, TokenizerFileError, required=True)
    assert data is not None
    if all(type(i) is int for i in data.values()):
        return data
    # Like the reference, entries whose value is not a number are skipped.
    return {token: i for token, i in data.items() if type(i) is int}


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """``merges.txt``: ``#version`` lines are skipped, every other line is two symbols and a space
    (blank lines, which the reference refuses, are skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerFileError(f"{path}: missing (a CLIP tokenizer folder has vocab.json and merges.txt)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise TokenizerFileError(f"{path}: cannot be read ({err})") from None
    lines = text.replace("\r\n", "\n").split("\n")
    pairs = [line.split(" ") for line in lines if line and not line.startswith("#version")]
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        number, line = next((n, line) for n, line in enumerate(lines, 1) if line and not line.startswith("#version") and not _is_pair(line))
        raise TokenizerFileError(f"{path}: line {number} is not two symbols separated by one space: {line[:60]!r}")
    return pairs  # type: ignore[return-value]


def _is_pair(line: str) -> bool:
    parts = line.split(" ")
    return len(parts) == 2 and all(parts)


def _vocab_and_merges_from_fast(data: dict[str, Any], path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
        raise TokenizerFileError(f"{path}: its model is not a BPE model")
    vocab = model.get("vocab")
    if isinstance(vocab, list):
        vocab = {(t[0] if isinstance(t, list) else t): i for i, t in enumerate(vocab)}
    if not isinstance(vocab, dict):
        raise TokenizerFileError(f"{path}: model.vocab is not an object")
    merges = []
    for number, merge in enumerate(model.get("merges") or [], start=1):
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(parts, list | tuple) or len(parts) != 2 or not all(isinstance(p, str) for p in parts):
            raise TokenizerFileError(f"{path}: merge {number} is not a pair of symbols: {merge!r}")
        merges.append((parts[0], parts[1]))
    return {t: int(i) for t, i in vocab.items() if isinstance(i, int)}, merges


def _check_token_dict(value: Any, path: Path, key: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("content"), str):
        raise TokenizerFileError(f"{path}: {key} is neither a string nor an object with a string 'content'")
    return value


def _parse_token(value: Any, path: Path, key: str) -> AddedToken:
    return AddedToken.from_json(_check_token_dict(value, path, key))


def _token_from_config(value: Any, path: Path, key: str) -> str | AddedToken | None:
    """A special token as ``tokenizer_config.json`` stores it: a string, ``null``, or an object
    (``{"__type": "AddedToken", "content": ...}``, whose ``normalized`` defaults to true)."""
    if value is None or isinstance(value, str | AddedToken):
        return value
    return _parse_token(value, path, key)
