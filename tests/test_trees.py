"""vit_jax.checkpoints.trees: nesting and flattening "/"-keyed parameter
trees."""

import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax.checkpoints import layouts
from vit_jax.checkpoints import trees


def test_recover_and_flatten_are_inverse():
  flat = {
      'Transformer/encoderblock_0/LayerNorm_0/scale': np.ones(3),
      'Transformer/encoderblock_0/LayerNorm_0/bias': np.zeros(3),
      'head/kernel': np.ones((3, 2)),
      'cls': np.zeros((1, 1, 3))
  }
  tree = trees.recover_tree(list(flat), list(flat.values()))
  assert tree['Transformer']['encoderblock_0']['LayerNorm_0']['bias'] is flat[
      'Transformer/encoderblock_0/LayerNorm_0/bias']
  assert set(tree) == {'Transformer', 'head', 'cls'}
  again = trees.flatten_tree(tree)
  assert list(again) == list(flat)
  assert all(again[k] is flat[k] for k in flat)


@pytest.mark.parametrize('keys,message', [
    (['a/b', 'a/b/c'], "'a/b/c' nests under a parameter 'b'"),
    (['a/b/c', 'a/b'], "'a/b' is both a parameter and a module"),
])
def test_keys_that_do_not_nest_are_refused(keys, message):
  with pytest.raises(trees.CheckpointError, match=message):
    trees.recover_tree(keys, range(len(keys)))


def test_checkpoint_and_layouts_share_them():
  """The original's `checkpoint.recover_tree` nests as `trees` and `layouts`
  do."""
  keys, values = ['a/b', 'a/c', 'd'], [1, 2, 3]
  assert (checkpoint.recover_tree(keys, values) == trees.recover_tree(
      keys, values) == {
          'a': {
              'b': 1,
              'c': 2
          },
          'd': 3
      })
  assert checkpoint.CheckpointError is trees.CheckpointError
  flat = {
      f'Transformer/encoderblock_{i}/MlpBlock_3/Dense_0/bias':
          np.full(2, i, np.float32) for i in range(3)
  }
  flat['Transformer/encoder_norm/bias'] = np.zeros(2, np.float32)
  scanned = layouts.layers_to_scan(flat, 3)
  np.testing.assert_array_equal(
      scanned['Transformer/encoderblock/MlpBlock_3/Dense_0/bias'],
      [[0, 0], [1, 1], [2, 2]])
  back = layouts.scan_to_layers(scanned)
  assert sorted(back) == sorted(flat)
  for k, v in flat.items():
    np.testing.assert_array_equal(back[k], v)
  with pytest.raises(trees.CheckpointError, match='both a parameter'):
    layouts.is_scanned({'a/b/c': 1, 'a/b': 2})


def test_flatten_keeps_empty_layers_on_request():
  tree = {'IdentityLayer_0': {}, 'head': {'bias': 1}}
  assert trees.flatten_tree(tree) == {'head/bias': 1}
  assert trees.flatten_tree(
      tree, keep_empty=True) == {
          'IdentityLayer_0': {},
          'head/bias': 1
      }


def test_to_dict_turns_mappings_into_plain_dicts():
  from flax.core import FrozenDict  # pylint: disable=g-import-not-at-top
  leaf = np.ones(2)
  out = trees.to_dict(FrozenDict({'a': {'b': leaf}}))
  assert type(out) is dict and type(out['a']) is dict  # pylint: disable=unidiomatic-typecheck
  assert out['a']['b'] is leaf
