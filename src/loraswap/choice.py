"""A setting ``auto`` resolved at start: its value and the reason it was chosen.

Its own module so the machine's choices and adapter sizing (which machine calls) both build them
without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Choice:
    value: Any
    source: str  # "auto", "env", "default"...
    reason: str
