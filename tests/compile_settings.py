"""How the suite compiles, in its own processes and in those it starts.

Most tests build tiny models and run them for a few steps, so their time
goes into compiling programs rather than running them. Every process
therefore compiles with most of XLA's optimizations off
(`JAX_DISABLE_MOST_OPTIMIZATIONS`) and with XLA:CPU's older fusion emitters
(`--xla_cpu_use_fusion_emitters=false`), which compile such programs about a
third faster (docs/style.md). Neither changes what a computation means; a
comparison's sides always compile alike. The main job's test trains for
hundreds of steps and runs faster optimized: it starts from
`optimized_env`, as a user's shell would.
"""

ENV = {'JAX_DISABLE_MOST_OPTIMIZATIONS': 'true'}
XLA_FLAGS = '--xla_cpu_use_fusion_emitters=false'


def xla_flags(devices: int) -> str:
  """XLA_FLAGS of a process with `devices` CPU devices, compiled like ours."""
  return f'{XLA_FLAGS} --xla_force_host_platform_device_count={devices}'


def optimized_env(env: dict) -> dict:
  """`env` without these settings (nor XLA_FLAGS): XLA's defaults."""
  env = dict(env)
  for name in ('XLA_FLAGS', *ENV):
    env.pop(name, None)
  return env
