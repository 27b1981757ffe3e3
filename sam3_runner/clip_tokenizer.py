"""SAM 3's text tokenizer, built offline: CLIP's BPE from the vocabulary file that `open_clip_torch` ships.

A lone Meta `sam3.pt` holds weights only. Its text encoder is OpenAI's CLIP text tower, whose tokenizer is the
byte-level BPE of `bpe_simple_vocab_16e6.txt.gz` (OpenAI's CLIP repo; open_clip and Meta's `sam3` package carry
the same file). The vocabulary is built exactly as their `SimpleTokenizer` builds it: the 256 byte symbols of
`bytes_to_unicode`, the same symbols with `</w>`, one token per merge (the first 49152 - 256 - 2 = 48894 merge
lines after the header), then `<|startoftext|>` (49406) and `<|endoftext|>` (49407): 49408 tokens.

Settings follow the hub's `facebook/sam3` tokenizer, which transformers' converter
(`models/sam3/convert_sam3_to_hf.py`) writes as `CLIPTokenizerFast.from_pretrained("openai/clip-vit-base-patch32",
max_length=32, model_max_length=32)`; its tokenizer_config.json: CLIPTokenizer, do_lower_case, pad, unk and eos
`<|endoftext|>`, bos `<|startoftext|>`, model_max_length 32. transformers' CLIPTokenizer normalizes with NFC,
whitespace folding and lower-casing; it does not run ftfy's mojibake repair or HTML unescaping as
`SimpleTokenizer` does, exactly like the hub's tokenizer.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

VOCABULARY_PACKAGE = "open_clip"  # from the distribution open_clip_torch
VOCABULARY_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGES = 49152 - 256 - 2  # the merge lines SimpleTokenizer keeps
CONTEXT_LENGTH = 32  # SAM 3's text context: Sam3Config().text_config.max_position_embeddings
VOCABULARY_SIZE = 49408


def vocabulary_path() -> Path:
    """Where open_clip_torch keeps the BPE file, found without importing open_clip (its import loads torch and timm).

    Raises FileNotFoundError when the package or the file is missing.
    """
    spec = importlib.util.find_spec(VOCABULARY_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / VOCABULARY_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{VOCABULARY_FILE} not found: install open_clip_torch (see requirements.txt)")


def _vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.decompress(vocabulary_path().read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(merge) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def clip_tokenizer() -> CLIPTokenizer:
    """CLIP's 49408-token BPE tokenizer with SAM 3's settings (32 tokens, padded with `<|endoftext|>`).

    Token ids equal OpenAI's / open_clip's `SimpleTokenizer` and Meta's: "a photo of a cat" ->
    [49406, 320, 1125, 539, 320, 2368, 49407].
    """
    vocab, merges = _vocabulary()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CONTEXT_LENGTH)
