"""Deterministic shards: N independent copies of the tool, none sending what another sends.

A (department, customer) key belongs to shard `int(sha256(department NUL customer)[:8]) % N`:
stable across processes, Python versions and platforms (unlike `hash()`), and per key, so
each customer's order holds within its one shard.
"""

from __future__ import annotations

import hashlib
import os
import re

from .errors import UsageError

_SPEC = re.compile(r"(\d+)/(\d+)")


def shard_of(department: str, customer: str, shards: int) -> int:
    digest = hashlib.sha256(f"{department}\x00{customer}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % shards


def parse_shard(spec: str | None, shards: int | None) -> tuple[int, int] | None:
    """`--shard K/N` (0-based K), or `--shards N` with K from JOB_COMPLETION_INDEX (what a
    Kubernetes Indexed Job sets)."""
    if spec is not None:
        match = _SPEC.fullmatch(spec.strip())
        if match is None:
            raise UsageError(f"--shard {spec!r} is not K/N", hint="e.g. --shard 0/3 (K from 0)")
        k, n = int(match[1]), int(match[2])
        if not 0 <= k < n:
            raise UsageError(f"--shard {spec}: K must be between 0 and N-1")
        if shards is not None and shards != n:
            raise UsageError(f"--shard {spec} and --shards {shards} disagree")
        return k, n
    if shards is None:
        return None
    if shards < 1:
        raise UsageError("--shards must be at least 1")
    index = os.environ.get("JOB_COMPLETION_INDEX")
    if index is None or not index.isdigit() or int(index) >= shards:
        raise UsageError(
            "--shards needs --shard K/N or JOB_COMPLETION_INDEX (0 to N-1) in the environment"
        )
    return int(index), shards


def shard_suffix(shard: tuple[int, int]) -> str:
    return f"shard-{shard[0]}-of-{shard[1]}"
