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

Every process, that one too, runs XLA's kernels on one thread
(`--xla_cpu_multi_thread_eigen=false`): the suite runs one pytest worker per
core, so a second thread in a process only waits for a core the other worker
holds (measured in docs/style.md).
"""

ENV = {'JAX_DISABLE_MOST_OPTIMIZATIONS': 'true'}
ONE_THREAD = '--xla_cpu_multi_thread_eigen=false'
XLA_FLAGS = f'--xla_cpu_use_fusion_emitters=false {ONE_THREAD}'


def xla_flags(devices: int) -> str:
  """XLA_FLAGS of a process with `devices` CPU devices, compiled like ours."""
  return f'{XLA_FLAGS} --xla_force_host_platform_device_count={devices}'


def optimized_env(env: dict) -> dict:
  """`env` with XLA's defaults, on one thread (XLA_FLAGS is ONE_THREAD)."""
  env = dict(env, XLA_FLAGS=ONE_THREAD)
  for name in ENV:
    env.pop(name, None)
  return env
