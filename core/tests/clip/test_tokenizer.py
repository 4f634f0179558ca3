"""gesso's CLIP tokenizer against transformers' ``CLIPTokenizer`` (the oracle) on the same files."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gesso.clip.tokenizer import BYTE_SYMBOLS, CLIPTokenizer, TokenizerFileError
from gesso.tiny import write_clip_tokenizer

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "",
    "a photo of an astronaut riding a horse on mars",
    "A Photo Of An ASTRONAUT, 4k, trending on ArtStation!!!",
    "hello!?! ... --- ((masterpiece)), [best quality], {detailed}",
    "don't we'll they're I've I'm he'd it's IT'S It'S 'tis ''s '''re 'x",
    "digits 1234567890 3.14 1e9 1/2 ½ ² ٣ ⅷ",
    "tabs\tand\nnew lines\r\n  runs   of \u00a0non-breaking\u3000ideographic\u2003em space",
    "café résumé naïve e\u0301 cafe\u0301 Å A\u030a",
    "東京タワー 漢字の夜景 한국어 텍스트",
    "emoji 🎉👍🏽 ❤️ 👨\u200d👩\u200d👧",
    "ΑΣ ΟΔΟΣ σοφός İstanbul ǅ ß ŉ ﬁ",
    "<|startoftext|>a cat<|endoftext|> and <|ENDOFTEXT|> <|StartOfText|> !!<|endoftext|>!!",
    "\x1c\x1dcontrol\x00chars\x7f and zero\u200bwidth",
    "a_b-c/d\\e@f#g$h%i^j&k*l+m=n|o~p`q",
    "</w> word</w>end",
    "the the the the cat cat the",
    "aaaa aaaaaaa abababab babab baaab",
    "a <Sparkle> b a\t <Sparkle>\n b<Sparkle>c <SPARKLE>",
    "x<tag>y x <tag> y _<tag> <tag>_ ²<tag>½ é<tag> <TAG> <Tag> [glow] [Glow] x[GLOW]",
    "<|extra|> <new> <NEW> <xtra2>",
    "a painting of a fox sitting in a field at sunrise in the style of Claude Monet, " * 6,
]

# Words whose halves become merges: nested, shared and conflicting sub-pieces, so BPE takes many
# merge steps in both orders; a few long merges are then moved to the front of the ranks.
WORDS_TEXT = (
    "a photo of an astronaut riding horse on mars painting fox sitting in field at sunrise style claude monet "
    "masterpiece best quality detailed portrait woman man cat dog landscape mountain river forest city night "
    "light lighting cinematic trending artstation digital art illustration concept beautiful highly intricate "
    "sharp focus octane render unreal engine the and with by from this that there their they're don't it's "
    "hello world café résumé naïve tokyo東京 emoji🎉 123 4k 8k hdr ultra realistic photorealistic anime"
)
WORDS = WORDS_TEXT.split()


def write_rich_tokenizer(folder: Path, words: list[str] = WORDS, front: int = 12, **config: object) -> Path:
    symbols = list(BYTE_SYMBOLS)
    vocab: dict[str, int] = {}
    for token in [*symbols, *(s + "</w>" for s in symbols)]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []

    def build(pieces: list[str]) -> str:
        if len(pieces) == 1:
            return pieces[0]
        left, right = build(pieces[: len(pieces) // 2]), build(pieces[len(pieces) // 2 :])
        if (left, right) not in merges:
            merges.append((left, right))
            vocab.setdefault(left + right, len(vocab))
        return left + right

    for word in words:
        spelt = [symbols[b] for b in word.encode("utf-8")]
        spelt[-1] += "</w>"
        build(spelt)
        if len(spelt) > 1:
            build(spelt[:-1] + [spelt[-1][:-4]])  # the word inside a longer one
    merges = merges[-front:] + merges[:-front] if front else merges
    # Merges ranked before the merges that make their parts: merging the leftmost lowest-ranked pair
    # then differs from merging every occurrence of a rank at once ("aaaa" is "aaa a", not "aa aa").
    for token in ("aa", "aaa", "ab", "abab", "ba", "bab"):
        vocab.setdefault(token, len(vocab))
    merges = [("aa", "a"), ("ab", "ab"), ("ba", "b"), *merges, ("a", "a"), ("a", "b"), ("b", "a")]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    settings = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True}
    settings.update(config)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")
    return folder


def _added(content: str, normalized: bool) -> dict[str, object]:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}


def _plain(content: str, normalized: bool = True) -> dict[str, object]:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}


def write_sd15_style(folder: Path) -> Path:
    """SD 1.5's files: AddedToken objects (normalized) but ``pad_token`` a plain string."""
    write_rich_tokenizer(
        folder,
        bos_token=_added("<|startoftext|>", True),
        eos_token=_added("<|endoftext|>", True),
        unk_token=_added("<|endoftext|>", True),
        pad_token="<|endoftext|>",
        errors="replace",
        add_prefix_space=False,
    )
    special_map = {"bos_token": _plain("<|startoftext|>"), "eos_token": _plain("<|endoftext|>"), "unk_token": _plain("<|endoftext|>")}
    (folder / "special_tokens_map.json").write_text(json.dumps({**special_map, "pad_token": "<|endoftext|>"}), encoding="utf-8")
    return folder


def write_sdxl2_style(folder: Path) -> Path:
    """SDXL's second tokenizer: pads with ``!`` and asks for a clean-up that BPE ignores."""
    write_sd15_style(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(pad_token="!", clean_up_tokenization_spaces=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    special_map = json.loads((folder / "special_tokens_map.json").read_text())
    (folder / "special_tokens_map.json").write_text(json.dumps({**special_map, "pad_token": "!"}), encoding="utf-8")
    return folder


def write_decoder_style(folder: Path) -> Path:
    """The newer layout: ``added_tokens_decoder`` with every flag, extra tokens outside the vocab."""
    entries = [
        {"content": "<|startoftext|>", "normalized": True, "special": True},
        {"content": "<|endoftext|>", "normalized": False, "special": True},
        {"content": "<Sparkle>", "normalized": False, "special": False, "lstrip": True, "rstrip": True},
        {"content": "<tag>", "normalized": True, "special": False, "single_word": True},
        {"content": "[GLOW]", "normalized": True, "special": True},
        {"content": "<Tag>", "normalized": False, "special": True, "single_word": False},
    ]
    decoder = {}
    for offset, entry in enumerate(entries):
        decoder[str(10_000 + offset)] = {"lstrip": False, "rstrip": False, "single_word": False, **entry}
    return write_rich_tokenizer(
        folder, added_tokens_decoder=decoder, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def write_legacy_added_style(folder: Path) -> Path:
    """``added_tokens.json`` and ``additional_special_tokens`` in ``special_tokens_map.json``."""
    write_rich_tokenizer(folder, model_max_length=16, padding_side="left", truncation_side="left")
    (folder / "added_tokens.json").write_text(json.dumps({"<new>": 99_999, "<|extra|>": 100_000}), encoding="utf-8")
    special_map = {"pad_token": "<|endoftext|>", "additional_special_tokens": ["<|extra|>", "<xtra2>"]}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map), encoding="utf-8")
    return folder


def write_split_special_style(folder: Path) -> Path:
    """``split_special_tokens``: special tokens in the text are spelt out, not matched."""
    write_sd15_style(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "split_special_tokens": True}), encoding="utf-8")
    return folder


STYLES = {
    "tiny": lambda folder: write_clip_tokenizer(folder),
    "rich": write_rich_tokenizer,
    "sd15": write_sd15_style,
    "sdxl2": write_sdxl2_style,
    "decoder": write_decoder_style,
    "legacy_added": write_legacy_added_style,
    "split_special": write_split_special_style,
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[CLIPTokenizer, object]]:
    """Per style: (gesso's tokenizer, transformers' tokenizer), both read from the same folder."""
    out = {}
    for name, write in STYLES.items():
        folder = tmp_path_factory.mktemp(name)
        write(folder)
        out[name] = (CLIPTokenizer.from_pretrained(folder), transformers.CLIPTokenizer.from_pretrained(folder))
    return out


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Texts mixing the classes the split rules tell apart."""
    pool = [
        *"abcxyzABCXYZ",
        *"0123456789",
        *" \t\n\u00a0\u3000\u2028",
        *"!?.,;:'\"-_/\\<>|()[]{}@#$%^&*+=~`",
        *"éÉüßçñøΣσİı",
        "e\u0301",
        "\u0301",
        *"東京한국ー",
        *"½²٣",
        "🎉",
        "👍🏽",
        "\u200b",
        "\x1c",
        "'s",
        "'S",
        "'ll",
        "'re",
        "<|endoftext|>",
        "<|startoftext|>",
        "<|ENDOFTEXT|>",
        "<tag>",
        "<Tag>",
        "<Sparkle>",
        "[GLOW]",
        "[glow]",
        "<|extra|>",
        "<new>",
        "</w>",
        "cat",
        "the",
        "aa",
        "ab",
        "astronaut",
        "riding",
        "monet",
    ]
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(0, 30))) for _ in range(count)]


@pytest.mark.parametrize("style", list(STYLES))
def test_ids_and_settings_match_reference(pairs, style):
    mine, reference = pairs[style]
    texts = PROMPTS + random_texts(150, seed=len(style))
    assert mine(texts).input_ids == reference(texts).input_ids
    for text in PROMPTS:
        assert mine(text).input_ids == reference(text).input_ids, text
        if style != "decoder":  # there the reference's tokens of lstrip/rstrip tokens include the stripped spaces
            assert mine.tokenize(text) == reference.tokenize(text), text
    for attribute in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "pad_token", "vocab_size", "model_max_length"):
        assert getattr(mine, attribute) == getattr(reference, attribute), attribute
    assert len(mine) == len(reference)
    assert mine.all_special_ids == reference.all_special_ids


def test_pad_token_comes_from_the_vocabulary(pairs):
    mine, reference = pairs["sdxl2"]
    assert mine.pad_token == "!" and mine.pad_token_id == reference.convert_tokens_to_ids("!") != mine.eos_token_id
    # "!" is a special token here, so it is cut out of the text before BPE, as in the reference.
    assert mine("wow!! great!").input_ids == reference("wow!! great!").input_ids


@pytest.mark.filterwarnings("ignore:`max_length` is ignored")
@pytest.mark.parametrize("style", ["sd15", "sdxl2", "legacy_added"])
@pytest.mark.parametrize("padding", [False, True, "longest", "max_length", "do_not_pad"])
@pytest.mark.parametrize("truncation", [None, True, False, "longest_first"])
@pytest.mark.parametrize("max_length", [None, 0, 1, 2, 5, 12])
def test_padding_and_truncation_match_reference(pairs, style, padding, truncation, max_length):
    mine, reference = pairs[style]
    texts = ["a cat", PROMPTS[1], PROMPTS[-1], ""]
    for add_special_tokens in (True, False):
        options = {"padding": padding, "truncation": truncation, "max_length": max_length, "add_special_tokens": add_special_tokens}
        got, want = mine(texts, **options), reference(texts, **options)
        assert got.input_ids == want.input_ids and got.attention_mask == want.attention_mask, options
        got, want = mine(texts[1], **options), reference(texts[1], **options)
        assert got["input_ids"] == want["input_ids"] and got["attention_mask"] == want["attention_mask"], options


def test_tensors_and_pipeline_usage(pairs):
    mine, reference = pairs["sd15"]
    prompts = [PROMPTS[1], PROMPTS[-1]]
    for options in ({"padding": "max_length", "max_length": 77, "truncation": True}, {"padding": "longest"}, {"padding": True}):
        got, want = mine(prompts, return_tensors="pt", **options), reference(prompts, return_tensors="pt", **options)
        assert got.input_ids.dtype == torch.long and torch.equal(got.input_ids, want.input_ids)
        assert torch.equal(got["attention_mask"], want["attention_mask"])
    single = mine(PROMPTS[1], return_tensors="pt").input_ids
    assert torch.equal(single, reference(PROMPTS[1], return_tensors="pt").input_ids) and single.shape[0] == 1
    assert "attention_mask" not in mine(prompts, return_attention_mask=False)
    assert mine(prompts, padding=True, padding_side="left").input_ids == reference(prompts, padding=True, padding_side="left").input_ids
    with pytest.raises(ValueError, match="tensor"):
        mine(prompts, return_tensors="pt")  # ragged
    from gesso.text_encoding import tokenize

    assert torch.equal(tokenize(mine, prompts), tokenize(reference, prompts))
    full = mine(prompts, padding="longest", return_tensors="pt").input_ids
    assert mine.batch_decode(full[:, 76:-1]) == reference.batch_decode(full[:, 76:-1])
    assert mine.encode(PROMPTS[2]) == reference.encode(PROMPTS[2])


@pytest.mark.parametrize("style", ["rich", "sd15", "sdxl2", "decoder"])
def test_decode_matches_reference(pairs, style):
    mine, reference = pairs[style]
    rows = reference(PROMPTS + random_texts(60, seed=7)).input_ids
    for skip in (False, True):
        assert mine.batch_decode(rows, skip_special_tokens=skip) == reference.batch_decode(rows, skip_special_tokens=skip)
        assert mine.decode(rows[3], skip_special_tokens=skip) == reference.decode(rows[3], skip_special_tokens=skip)
    # Cut multi-byte characters (invalid UTF-8), ids nothing has, a bare int, a tensor, a nested list.
    rng = random.Random(3)
    for _ in range(50):
        ids = [rng.randrange(0, len(reference) + 5) for _ in range(rng.randint(0, 8))]
        assert mine.decode(ids) == reference.decode(ids), ids
        assert mine.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)
        assert mine.convert_ids_to_tokens(ids, skip_special_tokens=True) == reference.convert_ids_to_tokens(ids, skip_special_tokens=True)
    assert mine.decode(7) == reference.decode(7)
    assert mine.decode(torch.tensor(rows[1])) == reference.decode(torch.tensor(rows[1]))
    assert mine.decode(rows[:2]) == reference.decode(rows[:2])
    tokens = ["a</w>", "zzz", "<|endoftext|>", "!"]
    assert mine.convert_tokens_to_ids(tokens) == reference.convert_tokens_to_ids(tokens)
    assert mine.convert_tokens_to_ids("zzz") == reference.convert_tokens_to_ids("zzz")


def test_unlimited_model_max_length(tmp_path):
    folder = write_rich_tokenizer(tmp_path / "unlimited")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["model_max_length"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    mine, reference = CLIPTokenizer.from_pretrained(folder), transformers.CLIPTokenizer.from_pretrained(folder)
    assert mine.model_max_length == reference.model_max_length > 10**20
    long = [PROMPTS[-1], "a"]
    for options in ({"padding": "max_length"}, {"truncation": True, "padding": True}):
        assert mine(long, **options).input_ids == reference(long, **options).input_ids


def test_tokenizer_json_only(tmp_path, pairs):
    _, reference = pairs["decoder"]
    reference.save_pretrained(tmp_path / "saved")
    folder = tmp_path / "saved"
    for name in ("vocab.json", "merges.txt"):
        (folder / name).unlink(missing_ok=True)
    assert (folder / "tokenizer.json").is_file()
    mine, again = CLIPTokenizer.from_pretrained(folder), transformers.CLIPTokenizer.from_pretrained(folder)
    texts = PROMPTS + random_texts(80, seed=11)
    assert mine(texts).input_ids == again(texts).input_ids
    assert mine.batch_decode(again(texts).input_ids) == again.batch_decode(again(texts).input_ids)


@pytest.mark.parametrize("style", ["sd15", "sdxl2", "decoder", "legacy_added"])
def test_save_pretrained_reloads_in_both(pairs, tmp_path, style):
    mine, reference = pairs[style]
    mine.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "CLIPTokenizer" and {"vocab.json", "merges.txt", "special_tokens_map.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    mine_again, reference_again = CLIPTokenizer.from_pretrained(tmp_path), transformers.CLIPTokenizer.from_pretrained(tmp_path)
    texts = PROMPTS + random_texts(80, seed=5)
    want = reference(texts, padding="max_length", truncation=True).input_ids
    assert reference_again(texts, padding="max_length", truncation=True).input_ids == want
    assert mine_again(texts, padding="max_length", truncation=True).input_ids == want
    assert reference_again.pad_token_id == reference.pad_token_id and mine_again.model_max_length == reference.model_max_length


def test_subfolder_of_a_pipeline(tmp_path):
    write_clip_tokenizer(tmp_path / "tokenizer")
    assert CLIPTokenizer.from_pretrained(tmp_path, subfolder="tokenizer")("a cat").input_ids[0] == 518


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("vocab.json", "{not json", r"vocab\.json: not valid JSON"),
        ("vocab.json", "[1, 2]", r"vocab\.json: expected a JSON object"),
        ("merges.txt", "#version: 0.2\nt h e\n", r"merges\.txt: line 2"),
        ("merges.txt", "#version: 0.2\nq \u0100\u0101\n", r"merge 1 \(q"),
        ("tokenizer_config.json", '{"model_max_length": ', r"tokenizer_config\.json: not valid JSON"),
        ("tokenizer_config.json", '{"bos_token": 5}', r"tokenizer_config\.json: bos_token"),
        ("special_tokens_map.json", "nope", r"special_tokens_map\.json: not valid JSON"),
    ],
)
def test_bad_files_give_one_line_naming_the_file(tmp_path, name, content, message):
    folder = write_clip_tokenizer(tmp_path / "tok")
    (folder / name).write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=message) as info:
        CLIPTokenizer.from_pretrained(folder)
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)


def test_missing_files(tmp_path):
    folder = write_clip_tokenizer(tmp_path / "tok")
    (folder / "merges.txt").unlink()
    with pytest.raises(TokenizerFileError, match=r"merges\.txt: missing"):
        CLIPTokenizer.from_pretrained(folder)
    (folder / "vocab.json").unlink()
    with pytest.raises(TokenizerFileError, match="neither vocab.json nor tokenizer.json"):
        CLIPTokenizer.from_pretrained(folder)


def test_import_does_not_load_transformers():
    code = (
        "import sys, gesso.clip.tokenizer; print(sorted(m for m in ('transformers', 'tokenizers', 'regex', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
