"""Shape buckets: tuned schedules are stored per power-of-two bucket of (S, SKV).

A schedule tuned at S=4096, SKV=32768 serves every shape that rounds up to the same powers of
two, so the database stays small and a new shape finds a tuned neighbour by bucket distance.
SHAPE_SETS names the shape lists a tuning run or a benchmark covers (`--shapes v32`).
"""
from __future__ import annotations

import math
import re

_BUCKET = re.compile(r"^S([0-9]+)-SKV([0-9]+)$")

# Shapes a tuning run covers. "v32": the DeepSeek-V3.2 prefill shapes (6 pairs); "decode": decode
# steps, S = B requests (each with next_n = 2 new tokens, so 2B query rows) x SKV = each request's
# context (B = 2 is the few-rows case a decode top-k must split, 128 a full serving batch);
# "smoke": one small pair for a quick end-to-end check.
SHAPE_SETS: dict[str, list[tuple[int, int]]] = {
    "v32": [(S, SKV) for S in (1024, 4096) for SKV in (8192, 32768, 131072)],
    "decode": [(B, SKV) for B in (2, 32, 128) for SKV in (32768, 131072)],
    "smoke": [(256, 4096)],
}
# the kernels a shape set is about, when --kernel is not given: "stages" (the three DSA stages) or
# "decode" (every kernel of the spec that works on the paged caches)
SHAPE_SET_KERNELS = {"v32": "stages", "decode": "decode", "smoke": "stages"}


def _pow2_ceil(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return 1 << (value - 1).bit_length()


def bucket_of(S: int, SKV: int) -> str:
    """The bucket name of a shape: each size rounded up to a power of two, e.g. 'S4096-SKV32768'."""
    return f"S{_pow2_ceil('S', S)}-SKV{_pow2_ceil('SKV', SKV)}"


def parse_bucket(text: str) -> tuple[int, int]:
    """(S, SKV) of a bucket name; the inverse of bucket_of."""
    match = _BUCKET.match(text) if isinstance(text, str) else None
    if match:
        S, SKV = int(match.group(1)), int(match.group(2))
        # powers of two >= 1, written without leading zeros (one name per bucket)
        if text == f"S{S}-SKV{SKV}" and all(n >= 1 and n & (n - 1) == 0 for n in (S, SKV)):
            return S, SKV
    raise ValueError(f"bad bucket {text!r}: allowed form is 'S<pow2>-SKV<pow2>', e.g. 'S4096-SKV32768'")


def bucket_distance(a: str, b: str) -> float:
    """How far apart two buckets are: |log2(Sa/Sb)| + |log2(SKVa/SKVb)| (0 for the same bucket)."""
    (sa, kva), (sb, kvb) = parse_bucket(a), parse_bucket(b)
    return abs(math.log2(sa / sb)) + abs(math.log2(kva / kvb))
