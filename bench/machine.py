"""The host a benchmark ran on, in one line (CPU name, family, vector units).

CPUs sold under one name differ: an AMD EPYC of family 25 (Zen 3/4) runs
512-bit vector FMAs at half the rate of family 26 (Zen 5), and Intel Xeons
with AMX multiply bfloat16 matrices several times faster than float32. Every
benchmark prints this line beside its numbers.
"""

import os
import platform


def cpu_description() -> str:
  """'<model name> (family F model M; avx512f ...), N cores'."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:  # The first processor's entry.
      info = dict(l.split(':', 1) for l in f.read().split('\n\n')[0]
                  .splitlines() if ':' in l)
  except OSError:
    info = {}
  info = {k.strip(): v.strip() for k, v in info.items()}
  if info:
    flags = set(info.get('flags', '').split())
    simd = [f for f in ('avx512f', 'avx512_bf16', 'amx_bf16') if f in flags]
    cpu = (f'{info.get("model name", cpu)} (family '
           f'{info.get("cpu family", "?")} model {info.get("model", "?")}; '
           f'{" ".join(simd) or "no avx512"})')
  return f'{cpu}, {os.cpu_count()} cores'
