"""Row ids: derived from a row's content when the input gives none, and checked unique at any scale.

A table row without an id column gets `<16 hex digits>` of the SHA-256 of its record (canonical
JSON: sorted keys, the values exactly as read), so inserting, removing or reordering rows between
runs changes no other row's id. Identical rows are told apart by occurrence: the second copy is
`<digest>-1`, the third `<digest>-2`, in input order. The digest is independent of the file's name and
location (a staged or moved copy keeps its ids).

`DigestSet` remembers 64-bit digests in sorted numpy runs (merged like a log-structured merge tree):
8 bytes per row where a Python set of the same keys takes ~70, so the one task that reads a step's
input checks 100 M ids in under 2 GB. Uniqueness of ids that come from an id column is checked on
64-bit digests of the ids: two distinct ids would be reported as a duplicate with a chance of about
n²/2^65 (3 in a million at 10 M rows).
"""

from __future__ import annotations

import hashlib

import numpy as np

DIGEST_BYTES = 8


def digest(text: str) -> bytes:
    """The 64-bit SHA-256 prefix of `text` (a row's canonical JSON, or an id)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:DIGEST_BYTES]


class DigestSet:
    """64-bit digests seen so far, checked and added a block at a time."""

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []  # sorted uint64 arrays without repeats, sizes decreasing

    def __len__(self) -> int:
        return sum(len(run) for run in self._runs)

    def add(self, keys: list[bytes]) -> np.ndarray:
        """Adds `keys` (DIGEST_BYTES each); returns, for each, whether it was seen before: in an earlier
        call, or earlier in this list."""
        block = np.frombuffer(b"".join(keys), dtype=np.uint64)
        seen = np.zeros(len(block), dtype=bool)
        for run in self._runs:
            at = np.searchsorted(run, block).clip(max=len(run) - 1)
            seen |= run[at] == block
        unique, first = np.unique(block, return_index=True)
        repeated = np.ones(len(block), dtype=bool)
        repeated[first] = False
        self._push(unique[~seen[first]])
        return seen | repeated

    def _push(self, run: np.ndarray) -> None:
        if len(run):
            self._runs.append(run)
        while len(self._runs) > 1 and len(self._runs[-2]) <= len(self._runs[-1]):
            newer = self._runs.pop()  # runs hold no key twice: merging two sorted runs is a stable sort
            self._runs[-1] = np.sort(np.concatenate([self._runs[-1], newer]), kind="stable")
