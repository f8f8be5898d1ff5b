"""`ConfigError`, which every config check raises, and close-name suggestions.

`python -m vit_jax.main` reports it as one paragraph and exits 2.
"""

import difflib
from typing import Iterable, List

MAX_SUGGESTIONS = 5


class ConfigError(ValueError):
  """A config value, command-line key or path that cannot work."""


def closest(word: str,
            candidates: Iterable[str],
            n: int = MAX_SUGGESTIONS,
            cutoff: float = 0.6) -> List[str]:
  """Up to `n` of `candidates` closest to `word` (difflib), best first."""
  return difflib.get_close_matches(word, list(candidates), n=n, cutoff=cutoff)
