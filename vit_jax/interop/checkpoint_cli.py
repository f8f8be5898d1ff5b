"""What a checkpoint holds: `python -m vit_jax.interop.checkpoint_cli`.

  inspect FILE                    keys, shapes, dtypes, parameter count, and
                                  the model the file holds (zoo name if any;
                                  a timm .pth/.safetensors: its timm model).
  convert IN OUT [--names N]      rewrite under linen or released names.
  resize IN OUT --image-size H W  resample the position embedding offline.
"""

import argparse
import math
import re
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from vit_jax.checkpoint import Params  # pylint: disable=g-multiple-import
from vit_jax.checkpoint import interpolate_posembed  # pylint: disable=g-multiple-import
from vit_jax.checkpoint import load  # pylint: disable=g-multiple-import
from vit_jax.checkpoint import save  # pylint: disable=g-multiple-import
from vit_jax.checkpoints import timm_layout
from vit_jax.checkpoints import torch_layouts
from vit_jax.checkpoints.npz import ENCODER_BLOCK
from vit_jax.checkpoints.npz import NAME_SCHEMES
from vit_jax.checkpoints.npz import read_npz
from vit_jax.checkpoints.posembed import image_grid
from vit_jax.checkpoints.trees import CheckpointError
from vit_jax.checkpoints.trees import flatten_tree
from vit_jax.checkpoints.trees import shape_of
from vit_jax.configs import choices
from vit_jax.configs import project_models

# ----------------------------------------------------------------------------
# What a checkpoint holds.


def describe(params: Params) -> Dict[str, Any]:
  """The model hyper-parameters of a canonical ViT parameter tree.

  Returns:
    A dict: sizes, resnet, classifier (a guess), grid (None when not square),
    num_tokens, representation_size, num_classes, num_params and zoo_names
    (matching MODEL_CONFIGS). Mixers: see `describe_mixer`.

  Raises:
    CheckpointError: no `embedding/kernel` of rank 4 (not a ViT).
  """
  if 'stem' in params and 'embedding' not in params:
    return describe_mixer(params)
  embedding = params.get('embedding', {})
  kernel = embedding.get('kernel') if isinstance(embedding, dict) else None
  if kernel is None or np.ndim(kernel) != 4:
    raise CheckpointError('No embedding/kernel of rank 4: not a ViT '
                          'checkpoint.')
  ph, pw, _, hidden = shape_of(kernel)
  info = {'hidden_size': hidden, 'patch_size': (ph, pw)}

  resnet, stem_stride = None, 1
  if 'conv_root' in params:
    width = shape_of(params['conv_root']['kernel'])[-1]
    stages = sorted((int(k[len('block'):]), v)
                    for k, v in params.items()
                    if re.fullmatch(r'block\d+', k))
    num_layers = tuple(
        sum(1
            for u in stage
            if re.fullmatch(r'unit\d+', u))
        for _, stage in stages)
    resnet = {
        'num_layers': num_layers,
        'width': width,
        'width_factor': width / 64
    }
    stem_stride = choices.stem_stride(num_layers)
  info['resnet'] = resnet
  info['pixels_per_token'] = (stem_stride * ph, stem_stride * pw)

  transformer = params.get('Transformer', {})
  blocks = sorted((int(k.rsplit('_', 1)[1]), v)
                  for k, v in transformer.items()
                  if ENCODER_BLOCK.match(k))
  info['num_layers'] = len(blocks)
  info['num_heads'] = info['mlp_dim'] = None
  if blocks:
    block = blocks[0][1]
    query = block.get('MultiHeadDotProductAttention_0', {}).get('query', {})
    if 'kernel' in query:
      info['num_heads'] = shape_of(query['kernel'])[1]
    dense = block.get('MlpBlock_0', {}).get('Dense_0', {})
    if 'kernel' in dense:
      info['mlp_dim'] = shape_of(dense['kernel'])[1]

  info['has_class_token'] = 'cls' in params
  info['classifier'] = 'token' if info['has_class_token'] else 'gap'
  posemb = transformer.get('posembed_input', {}).get('pos_embedding')
  info['num_tokens'] = info['grid'] = None
  if posemb is not None:
    info['num_tokens'] = shape_of(posemb)[1]
    grid_tokens = info['num_tokens'] - int(info['has_class_token'])
    g = math.isqrt(max(grid_tokens, 0))
    if g * g == grid_tokens:
      info['grid'] = (g, g)
  pre_logits = params.get('pre_logits', {})
  info['representation_size'] = (
      shape_of(pre_logits['kernel'])[-1] if 'kernel' in pre_logits else None)
  head = params.get('head', {})
  info['num_classes'] = (
      shape_of(head['kernel'])[-1] if 'kernel' in head else None)
  info['num_params'] = sum(
      int(np.prod(shape_of(v))) for v in flatten_tree(params).values())
  info['zoo_names'] = _zoo_names(info)
  return info


def describe_mixer(params: Params) -> Dict[str, Any]:
  """`describe` of an MLP-Mixer tree."""
  kernel = params['stem'].get('kernel')
  if kernel is None or np.ndim(kernel) != 4:
    raise CheckpointError('No stem/kernel of rank 4: not a Mixer checkpoint.')
  ph, pw, _, hidden = shape_of(kernel)
  blocks = [v for k, v in params.items() if re.fullmatch(r'MixerBlock_\d+', k)]
  mlp_dims = {}
  for mlp in ('token_mixing', 'channel_mixing'):
    dense = blocks[0].get(mlp, {}).get('Dense_0', {}) if blocks else {}
    mlp_dims[mlp] = shape_of(dense['kernel']) if 'kernel' in dense else None
  head = params.get('head', {})
  info = {
      'model':
          'Mixer',
      'hidden_dim':
          hidden,
      'patch_size': (ph, pw),
      'num_blocks':
          len(blocks),
      'num_tokens': (mlp_dims['token_mixing'] or (None,))[0],
      'tokens_mlp_dim': (mlp_dims['token_mixing'] or (None, None))[1],
      'channels_mlp_dim': (mlp_dims['channel_mixing'] or (None, None))[1],
      'num_classes':
          shape_of(head['kernel'])[-1] if 'kernel' in head else None,
      'num_params':
          sum(int(np.prod(shape_of(v))) for v in flatten_tree(params).values()),
  }
  info['zoo_names'] = [
      name for name, c in project_models.ALL_MODEL_CONFIGS.items()
      if 'num_blocks' in c and tuple(c.patches.size) == (ph, pw) and all(
          c[k] == info[k] for k in ('hidden_dim', 'num_blocks',
                                    'tokens_mlp_dim', 'channels_mlp_dim'))
  ]
  return info


def _zoo_names(info: Dict[str, Any]) -> List[str]:
  """MODEL_CONFIGS entries with the same architecture (head sizes aside)."""
  names = []
  for name, config in project_models.ALL_MODEL_CONFIGS.items():
    if config.get('transformer') is None:  # a Mixer or a BiT ResNet
      continue
    resnet = config.get('resnet')
    if resnet is None:
      same_resnet = info['resnet'] is None
    else:
      ours = info['resnet'] or {}
      same_resnet = (
          tuple(resnet.num_layers) == ours.get('num_layers') and
          int(64 * resnet.width_factor) == ours.get('width'))
    has_class_token = config.classifier in ('token', 'token_unpooled')
    if (same_resnet and config.hidden_size == info['hidden_size'] and
        tuple(config.patches.size) == info['patch_size'] and
        config.transformer.num_layers == info['num_layers'] and
        config.transformer.num_heads == info['num_heads'] and
        config.transformer.mlp_dim == info['mlp_dim'] and
        has_class_token == info['has_class_token']):
      names.append(name)
  return names


def _names_scheme(flat_keys: Sequence[str]) -> str:
  """Which layout a file's keys are in, for display."""
  parts = []
  keys = list(flat_keys)
  for prefix, what in (('opt/target/', 'old flax optimizer (opt/target/)'),
                       ('params/', 'under params/')):
    if any(k.startswith(prefix) for k in keys):
      parts.append(what)
      keys = [k[len(prefix):] for k in keys if k.startswith(prefix)]
      break
  if 'pos_embedding' in keys or any(
      k.startswith('Transformer/encoderblock/') for k in keys):
    parts.append('big_vision')
  if any(
      re.search(r'encoderblock_\d+/MultiHeadDotProductAttention_1/', k)
      for k in keys):
    parts.append('released (pre-linen) names')
  elif any(
      re.search(r'encoderblock(_\d+)?/MultiHeadDotProductAttention_0/', k)
      for k in keys):
    parts.append('linen names')
  return ', '.join(parts) or 'unknown'


def _fmt_grid(grid) -> str:
  return f'{grid[0]}x{grid[1]}'


def _describe_lines(info: Dict[str, Any]) -> List[str]:
  """Human-readable `describe` output, one fact per line."""
  zoo_line = 'zoo_name: ' + (' or '.join(info['zoo_names']) or 'none')
  if info.get('model') == 'Mixer':
    fields = ('hidden_dim', 'num_blocks', 'tokens_mlp_dim', 'channels_mlp_dim',
              'num_tokens', 'num_classes')
    return (['model: MLP-Mixer'] + [f'{k}: {info[k]}' for k in fields] +
            [f'patch_size: {_fmt_grid(info["patch_size"])}', zoo_line])
  lines = [
      f'hidden_size: {info["hidden_size"]}',
      f'num_layers: {info["num_layers"]}', f'num_heads: {info["num_heads"]}',
      f'mlp_dim: {info["mlp_dim"]}',
      f'patch_size: {_fmt_grid(info["patch_size"])}'
  ]
  resnet = info['resnet']
  if resnet is None:
    lines.append('resnet: none')
  else:
    lines.append(f'resnet: stages {resnet["num_layers"]} (units per stage), '
                 f'root width {resnet["width"]} (width_factor '
                 f'{resnet["width_factor"]:g})')
  lines.append(f'pixels_per_token: {_fmt_grid(info["pixels_per_token"])}')
  sh, sw = info['pixels_per_token']
  if info['grid'] is not None:
    gh, gw = info['grid']
    lines.append(f'grid: {gh}x{gw} ({gh * sh}x{gw * sw} images)')
  elif info['num_tokens'] is not None:
    lines.append(f'grid: not square ({info["num_tokens"]} tokens)')
  else:
    lines.append('grid: no learned position embedding')
  lines.append(f'classifier: {info["classifier"]} (' +
               ('class token present; or token_unpooled)'
                if info['has_class_token'] else 'no class token; or unpooled)'))
  lines.append(f'representation_size: {info["representation_size"]}')
  lines.append(f'num_classes: {info["num_classes"]}')
  lines.append(zoo_line)
  return lines


# ----------------------------------------------------------------------------
# Command line.


class _ArgumentParser(argparse.ArgumentParser):
  """argparse with a one-line error message."""

  def error(self, message):
    self.exit(2, f'{self.prog}: error: {message}\n')


def _parser() -> argparse.ArgumentParser:
  parser = _ArgumentParser(
      prog='python -m vit_jax.interop.checkpoint_cli',
      description='Inspect, convert and resize ViT .npz checkpoints.')
  commands = parser.add_subparsers(
      dest='command', required=True, parser_class=_ArgumentParser)
  inspect = commands.add_parser(
      'inspect', help='keys, shapes, parameter count, model description')
  inspect.add_argument('file')
  convert = commands.add_parser(
      'convert', help='rewrite under linen or released (pre-linen) names')
  convert.add_argument('input')
  convert.add_argument('output')
  convert.add_argument('--names', choices=NAME_SCHEMES, default='released')
  resize = commands.add_parser(
      'resize', help='resample the position embedding to a new image size')
  resize.add_argument('input')
  resize.add_argument('output')
  resize.add_argument(
      '--image-size', type=int, nargs=2, required=True, metavar=('H', 'W'))
  resize.add_argument(
      '--source-image-size',
      type=int,
      nargs=2,
      metavar=('H', 'W'),
      help='the checkpoint\'s resolution, needed only when '
      'its grid is not square')
  resize.add_argument(
      '--method',
      choices=('bilinear', 'bicubic'),
      default='bilinear',
      help='bilinear: corner-aligned, the original\'s')
  resize.add_argument(
      '--names',
      choices=NAME_SCHEMES,
      help='default: linen for a linen-named input, else '
      'released')
  return parser


def _inspect(path: str) -> None:
  if torch_layouts.is_torch_file(path):  # a timm state dict
    params, _, timm_model = timm_layout.read(path)
    flat = flatten_tree(params)
    layout = f'timm state dict of {timm_model}'
  else:
    flat = read_npz(path)
    params = load(path)
    layout = _names_scheme(list(flat))
  print(f'{path}')
  width = max(len(k) for k in flat)
  for key in sorted(flat):
    print(f'  {key:<{width}}  {str(flat[key].shape):<18} {flat[key].dtype}')
  info = describe(params)
  print(f'layout: {layout}')
  print(f'parameters: {info["num_params"]:,}')
  for line in _describe_lines(info):
    print(line)


def _convert(args) -> None:
  params = load(args.input)
  save(params, args.output, names=args.names)
  print(f'Wrote {args.output} ({args.names} names).')


def _resize(args) -> None:
  flat = read_npz(args.input)
  params = load(args.input)
  info = describe(params)
  if info.get('model') == 'Mixer':
    raise CheckpointError(
        f'Checkpoint {args.input!r} is an MLP-Mixer: its token-mixing MLPs '
        'are sized for its token count, so it cannot be resized.')
  posembed = params.get('Transformer', {}).get('posembed_input', {})
  if 'pos_embedding' not in posembed:
    raise CheckpointError(f'Checkpoint {args.input!r} has no learned position '
                          'embedding to resize.')
  old = posembed['pos_embedding']
  try:
    grid = image_grid(args.image_size, info['pixels_per_token'], 'new')
    old_grid = (None if args.source_image_size is None else image_grid(
        args.source_image_size, info['pixels_per_token'], 'source'))
    new = interpolate_posembed(
        old,
        grid[0] * grid[1] + int(info['has_class_token']),
        info['has_class_token'],
        grid=grid,
        old_grid=old_grid,
        method=args.method)
  except CheckpointError as e:
    raise CheckpointError(f'Checkpoint {args.input!r}: {e}') from None
  posembed['pos_embedding'] = new
  names = args.names
  if names is None:
    scheme = _names_scheme(list(flat))
    names = 'linen' if 'linen names' in scheme else 'released'
  save(params, args.output, names=names)
  print(f'Resized the position embedding {old.shape} -> {new.shape} '
        f'(grid {_fmt_grid(grid)}, {args.method}); wrote {args.output} '
        f'({names} names).')


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line; returns the exit status."""
  args = _parser().parse_args(argv)
  try:
    if args.command == 'inspect':
      _inspect(args.file)
    elif args.command == 'convert':
      _convert(args)
    elif args.command == 'resize':
      _resize(args)
  except (CheckpointError, ValueError) as e:
    message = '; '.join(
        line.strip() for line in str(e).splitlines() if line.strip())
    print(f'error: {message}', file=sys.stderr)
    return 1
  except BrokenPipeError:  # `inspect FILE | head`
    return 0
  return 0


if __name__ == '__main__':
  sys.exit(main())
