"""The BART tokenizer with KILM's five special tokens, from a path, a hub id, GPT-2 BPE files, or
trained locally on the corpus (byte-level BPE, like BART's own)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from kilm_ray.errors import UserInputError
from kilm_ray.method.masking import SpecialIds

KILM_TOKENS = ["<ent>", "</ent>", "<ent_desc>", "</ent_desc>", "<sep>"]
BART_BASE_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


class TokenizerError(UserInputError, ValueError):
    pass


def add_kilm_tokens(tokenizer):
    """Add the five KILM tokens (idempotent); they are never split and never masked."""
    missing = [t for t in KILM_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    _check_tokenizer(tokenizer)
    return tokenizer


def _check_tokenizer(tokenizer) -> None:
    # transformers 5 silently builds an empty vocabulary from unknown keyword arguments: catch that.
    probe = tokenizer(" the history of the world", add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id
    if not probe or all(i == unk for i in probe) or len(tokenizer) < 256:
        raise TokenizerError(f"tokenizer looks empty (vocab {len(tokenizer)}, ' the history' -> {probe})")
    for token in BART_BASE_TOKENS:
        if tokenizer.convert_tokens_to_ids(token) in (None, unk) and token != "<unk>":
            raise TokenizerError(f"tokenizer lacks BART's {token} token")


def _prefix_kwargs(add_prefix_space: Optional[bool]) -> dict:
    return {} if add_prefix_space is None else {"add_prefix_space": add_prefix_space}


def from_bpe_files(vocab_json: str | Path, merges_txt: str | Path, add_prefix_space: Optional[bool] = None):
    from transformers import BartTokenizerFast

    tokenizer = BartTokenizerFast(vocab=str(vocab_json), merges=str(merges_txt), **_prefix_kwargs(add_prefix_space))
    return add_kilm_tokens(tokenizer)


def train_bpe(texts: Iterable[str], vocab_size: int, add_prefix_space: bool = False):
    """A byte-level BPE trained on ``texts``, wrapped as a BART tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import BartTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=add_prefix_space)
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=BART_BASE_TOKENS, show_progress=False)
    model = json.loads(bpe._tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = BartTokenizerFast(vocab=model["vocab"], merges=merges, **_prefix_kwargs(add_prefix_space or None))
    return add_kilm_tokens(tokenizer)


def load_tokenizer(source: str, add_prefix_space: Optional[bool] = None):
    """``gpt2-bpe:DIR``, a saved tokenizer directory, or a hub id (no network here: local only).
    ``add_prefix_space``: as the official KILM code passes it for BART (None: the tokenizer's own)."""
    if source.startswith("gpt2-bpe:"):
        directory = Path(source.split(":", 1)[1]).expanduser()
        vocab, merges = directory / "encoder.json", directory / "vocab.bpe"
        for f in (vocab, merges):
            if not f.is_file():
                raise TokenizerError(f"tokenizer.source={source}: {f} not found")
        return from_bpe_files(vocab, merges, add_prefix_space)
    if source == "train":
        raise TokenizerError("tokenizer.source=train is trained during preprocessing, not loaded")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_prefix_kwargs(add_prefix_space))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot load tokenizer {source!r}: {str(exc).splitlines()[0]}") from None
    return add_kilm_tokens(tokenizer)


class CorpusTokenizer:
    """The tokenizer's Rust backend alone (``tokenizer.json``), for preprocessing workers: the same ids
    and offsets as the transformers tokenizer (checked on the whole dump excerpt in the tests), but
    ready in milliseconds instead of the seconds that importing transformers costs each actor."""

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(tokenizer_json)

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        found = self.backend.token_to_id(token)
        if found is None:
            raise TokenizerError(f"token {token!r} is not in the tokenizer")
        return found


def _single_token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else -1


def special_ids(tokenizer) -> SpecialIds:
    ids = tokenizer.convert_tokens_to_ids(KILM_TOKENS)
    return SpecialIds(
        bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id,
        mask=tokenizer.mask_token_id, ent=ids[0], ent_end=ids[1], desc=ids[2], desc_end=ids[3], sep=ids[4],
        comma=_single_token(tokenizer, ","), colon=_single_token(tokenizer, ":"),
    )


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the whole tokenizer (vocabulary, merges, added tokens): the Serve ingress sends it
    with each request so a model replica never decodes ids made by another export's tokenizer."""
    import hashlib

    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]
