"""The Qwen2.5-VL tokenizer as Lance uses it, plus the special token ids of the official code.

The official code reads `vocab.json` + `merges.txt` + `tokenizer_config.json` with the slow
`Qwen2Tokenizer` (official `modeling/qwen2/tokenization_qwen2.py`).  We build the same byte-level BPE
from those same files with the `tokenizers` library (NFC normalisation, the Qwen2 split regex, no BOS), so
`tokenizer.json` is never needed and cannot disagree with them.  The token ids of the parity fixtures
(made by the slow tokenizer) and an independent tiktoken encoding are the tests of this equivalence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# GPT-2 style pre-tokenisation regex of Qwen2.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VIDEO_PAD = "<|video_pad|>"


def build_fast_tokenizer(
    vocab: dict[str, int], merges: list[tuple[str, str]], added: list[tuple[int, str, bool]]
):
    """A `tokenizers.Tokenizer` equal to the slow Qwen2 tokenizer over these files."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False)
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    for token_id, content, special in sorted(added):
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
        if tok.token_to_id(content) != token_id:
            raise ValueError(
                f"added token {content!r} got id {tok.token_to_id(content)}, expected {token_id}"
            )
    return tok


@dataclass(frozen=True)
class SpecialTokens:
    """Ids the official code derives in `add_special_tokens` (`data/data_utils.py`) and from
    `llm_config.json`."""

    im_start: int  # also the official "bos_token_id"
    im_end: int  # "eos_token_id": generation stops after emitting it
    vision_start: int
    vision_end: int
    pad: int  # <|endoftext|>; only pads position ids in x2t
    visual_placeholder: (
        int  # <|video_pad|>: the placeholder of EVERY visual token (ViT or VAE, image or video)
    )


class LanceTokenizer:
    """Encode/decode text with the Qwen2.5-VL vocabulary; `len(tok)` masks the logits in x2t."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        vocab = json.loads((model_dir / "vocab.json").read_text(encoding="utf-8"))
        lines = (model_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        cfg = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        added = [
            (int(i), t["content"], bool(t.get("special", False)))
            for i, t in cfg.get("added_tokens_decoder", {}).items()
        ]
        self._tok = build_fast_tokenizer(vocab, merges, added)  # type: ignore[arg-type]
        ids = {name: self.token_id(name) for name in (IM_START, IM_END, VISION_START, VISION_END, VIDEO_PAD)}
        self.special = SpecialTokens(
            im_start=ids[IM_START],
            im_end=ids[IM_END],
            vision_start=ids[VISION_START],
            vision_end=ids[VISION_END],
            pad=self.token_id(cfg.get("pad_token") or "<|endoftext|>"),
            visual_placeholder=ids[VIDEO_PAD],
        )

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return token_id

    def encode(self, text: str) -> list[int]:
        """Token ids without any added BOS/EOS; special-token strings in `text` map to their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` with special tokens kept (as the official `tokenizer.decode`)."""
        return self._tok.decode(ids, skip_special_tokens=False)
