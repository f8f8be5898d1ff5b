"""The error every config check raises, and the close names it suggests.

`ConfigError` is a config value, command-line key or path that cannot work;
`python -m vit_jax.main` reports it as one paragraph and exits 2. The input
pipeline raises it too (an unknown dataset name), which is why it lives below
both `validation` and `vit_jax.input_pipeline`.
"""

import difflib
from typing import Iterable, List

MAX_SUGGESTIONS = 5


class ConfigError(ValueError):
  """A config value, command-line key or path that cannot work."""


def closest(word: str, candidates: Iterable[str], n: int = MAX_SUGGESTIONS,
            cutoff: float = 0.6) -> List[str]:
  """Up to `n` of `candidates` closest to `word` (difflib), best first."""
  return difflib.get_close_matches(word, list(candidates), n=n, cutoff=cutoff)
