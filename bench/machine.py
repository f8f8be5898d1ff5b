"""The host a benchmark ran on, in one line (CPU name, family, vector units).

CPUs sold under one name differ: an AMD EPYC of family 25 has no AVX-512
(Zen 3) or runs each 512-bit instruction as two 256-bit halves (Zen 4), where
family 26 (Zen 5) has 512-bit units
(http://numberworld.org/blogs/2024_8_7_zen5_avx512_teardown); Intel Xeons
with AMX multiply bfloat16 matrices several times faster than float32. Every
benchmark prints this line beside its numbers.
"""

import os
import platform
import sys


def cpu_description() -> str:
  """'<model name> (family F model M; avx512f ...), N cores'."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:  # The first processor's entry.
      info = dict(
          l.split(':', 1)
          for l in f.read().split('\n\n')[0].splitlines()
          if ':' in l)
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


def force_cpu_devices(count: int) -> None:
  """Asks XLA for `count` CPU devices, unless XLA_FLAGS already sets a
  number; call it before JAX is imported."""
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_force_host_platform_device_count' not in flags:
    os.environ['XLA_FLAGS'] = (
        f'{flags} --xla_force_host_platform_device_count={count}'.strip())


def print_header(module: str, argv=None) -> None:
  """Prints the command line (`python -m <module> <argv>`, default the
  process's arguments) and the machine with its JAX devices: the first two
  lines of a benchmark."""
  import jax  # pylint: disable=g-import-not-at-top
  argv = sys.argv[1:] if argv is None else argv
  print(f'command: python -m {module} ' + ' '.join(argv))
  print(
      f'machine: {cpu_description()}; {jax.device_count()} '
      f'{jax.devices()[0].platform} devices; jax {jax.__version__}',
      flush=True)


def describe_machine() -> str:
  """Device, and the host CPU's name, family, model and wide-vector flags."""
  import jax  # pylint: disable=g-import-not-at-top  (after force_cpu_devices)
  dev = jax.devices()[0]
  return (f'{dev.platform} / {dev.device_kind} x{jax.device_count()}; host '
          f'{cpu_description()}')
