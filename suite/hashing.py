"""Short content keys for caches (light: no torch, so listing and planning stay cheap)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def cache_key(*parts: Any) -> str:
    """16 hex digits of SHA-256 over the parts as canonical JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
