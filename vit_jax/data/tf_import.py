"""TensorFlow for the input pipeline, imported without Keras.

`import tensorflow` imports Keras 3 eagerly, about half its start-up time;
vit_jax only needs tf.data, decoding and tf.io.gfile, so every module takes
TensorFlow from here (`tf.keras` still loads Keras on use).
"""

import sys
import types


def import_tensorflow() -> types.ModuleType:
  """`tensorflow`, imported without Keras if not imported yet."""
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
