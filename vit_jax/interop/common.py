"""What every part of vit_jax.interop shares: the error type, names, and short key lists."""

import re

POSEMB = 'Transformer/posembed_input/pos_embedding'


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not fit; the message is one line."""


def one_line(error: Exception) -> str:
  """An exception's message on one line, at most about 200 characters."""
  text = ' '.join(str(error).split())
  return text[:200] + ('...' if len(text) > 200 else '')


_BLOCK_INDEX = re.compile(r'(encoderblock_|blocks\.)(\d+)')


def short_names(keys, limit: int = 8) -> str:
  """Keys, short: 'Transformer/encoderblock_12..23 (192 arrays), head (2 arrays), cls'.

  Our names are cut to their first two levels; block indices are gathered into ranges.
  """
  groups = {}  # name with '#' for the block index -> (number of keys, block indices)
  for key in keys:
    name = '/'.join(key.split('/')[:2]) if key.count('/') >= 2 else key.split('/')[0]
    match = _BLOCK_INDEX.search(name)
    if match:
      name = name[:match.start(2)] + '#' + name[match.end(2):]
    count, indices = groups.get(name, (0, set()))
    groups[name] = (count + 1, indices | ({int(match[2])} if match else set()))
  shown = []
  for name, (count, indices) in list(groups.items())[:limit]:
    if indices:
      low, high = min(indices), max(indices)
      span = str(low) if low == high else (f'{low}..{high}' if len(indices) == high - low + 1
                                           else ','.join(map(str, sorted(indices))))
      name = name.replace('#', span)
    shown.append(f'{name} ({count} arrays)' if count > 1 else name)
  more = len(groups) - limit
  return ', '.join(shown) + (f' and {more} more' if more > 0 else '')

