"""TensorFlow for the input pipeline, imported without Keras.

vit_jax uses TensorFlow for tf.data, image decoding and tf.io.gfile only.
`import tensorflow` also imports Keras 3 eagerly (and with it scikit-learn
and matplotlib.pyplot), which is half of its start-up time: about 3 of 7
CPU seconds per process. `import_tensorflow()` imports TensorFlow with that
eager import skipped; `tf.keras` still loads Keras when something uses it.
Every module of vit_jax that needs TensorFlow gets it from here, so the
first import in a process is this one.
"""

import sys
import types


def import_tensorflow() -> types.ModuleType:
  """Returns the `tensorflow` module, importing it without Keras if it is
  not imported yet."""
  if 'tensorflow' in sys.modules:
    return sys.modules['tensorflow']
  # A None entry makes `import keras` fail and find_spec('keras') return
  # None, which TensorFlow's __init__ treats as "Keras not installed".
  keras_entry = sys.modules.get('keras', _ABSENT)
  if keras_entry is _ABSENT:
    sys.modules['keras'] = None
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top
  finally:
    if keras_entry is _ABSENT and sys.modules.get('keras', _ABSENT) is None:
      del sys.modules['keras']
  return tensorflow


_ABSENT = object()
