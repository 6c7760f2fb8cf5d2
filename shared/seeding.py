"""Per-sample seeds: every (variant, sample) draws its randomness from a seed
derived from (suite seed, variant id, sample key), so generated output does not
depend on worker count, processing order or resumption."""
from __future__ import annotations

import hashlib


def sample_seed(suite_seed: int, variant_id: str, key: str) -> int:
    """A 32-bit seed for one (variant, sample); stable across platforms and runs.

    32 bits because NumPy's legacy ``np.random.seed`` (which the reference
    corruptions use) accepts nothing larger.

    >>> sample_seed(0, "natural/fog-3", "ILSVRC2012_val_00000001") == sample_seed(0, "natural/fog-3", "ILSVRC2012_val_00000001")
    True
    """
    digest = hashlib.sha256(f"{int(suite_seed)}\x00{variant_id}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
