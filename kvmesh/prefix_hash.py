"""Prefix-cache block hashes, shared by the engine (which caches blocks under them) and the router
(which predicts where a prompt's blocks are cached). Imports no torch and nothing from the tiers.

A block's hash is chained: it covers its parent block's hash, the block's token ids and the extra
keys, so equal hashes mean equal *prefixes*, not merely equal blocks, and a prompt's hashes can be
matched against a replica's set of cached hashes one by one from the start. Only FULL blocks get a
hash: a partial block is never shared.

    root  = H(VERSION, cache_salt)                    (the namespace: requests with another salt never match)
    h[0]  = H(root,   tokens[0:B])
    h[i]  = H(h[i-1], tokens[i*B:(i+1)*B])

H is BLAKE2b with an 8-byte digest, read as an unsigned 64-bit integer (a uint64 on the wire). It
is stable across processes, machines and Python versions, unlike the salted builtin hash(). The
engine keeps each block's token ids beside its hash and compares them on a hit, so a 64-bit
collision of two different prefixes cannot hand one request another's KV.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Callable, Sequence

VERSION = b"kvmesh-prefix-v1"  # bump when the scheme changes: old and new hashes never meet
_PARENT = struct.Struct("<Q")
assert array("I").itemsize == 4, "token ids are packed as 4-byte integers"


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def root_hash(cache_salt: str = "") -> int:
    """The parent of a sequence's first block: the version and the request's cache salt."""
    return _digest(VERSION + b"\x00" + cache_salt.encode("utf-8"))


def _tokens_bytes(token_ids: Sequence[int]) -> bytes:
    packed = array("I", token_ids)  # unsigned 32-bit, the width of a token id on the wire
    if sys.byteorder == "big":
        packed.byteswap()  # little-endian everywhere, so every machine agrees
    return packed.tobytes()


def block_hash(parent_hash: int, token_ids: Sequence[int]) -> int:
    """The hash of one full block given its parent's hash (root_hash() for the first block)."""
    return _digest(_PARENT.pack(parent_hash) + _tokens_bytes(token_ids))


def extend_block_hashes(hashes: list[int], num_blocks: int, block_tokens: Callable[[int], Sequence[int]],
                        cache_salt: str = "") -> list[int]:
    """Append the hashes of blocks len(hashes) .. num_blocks - 1 to `hashes` (in place); return it.

    `block_tokens(i)` gives block i's token ids. `hashes` must be this sequence's own earlier result:
    the engine calls this as a sequence grows, so each block is hashed once.
    """
    parent = hashes[-1] if hashes else root_hash(cache_salt)
    for i in range(len(hashes), num_blocks):
        parent = block_hash(parent, block_tokens(i))
        hashes.append(parent)
    return hashes


def prompt_block_hashes(token_ids: Sequence[int], block_size: int, cache_salt: str = "") -> list[int]:
    """The hashes of every full block of token_ids (the router's view of a prompt)."""
    return extend_block_hashes([], len(token_ids) // block_size,
                               lambda i: token_ids[i * block_size:(i + 1) * block_size], cache_salt)
