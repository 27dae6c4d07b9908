"""The mask half of the transformers integration: what transformers' mask functions hand each layer
under attn_implementation="fastattn".

Where the model's mask is a plain pattern (causal, bidirectional, their sliding windows) over padding,
a layer gets a CompactMask: the pattern, the padding as (B, keys) and, for packed sequences, their
sequence ids; no O(N^2) tensor. Anything else gets SDPA's 4-D boolean mask, as does a model that asks
for the mask materialized (allow_is_causal_skip=False: Falcon adds ALiBi to it, Doge its dynamic
mask). A model whose own code uses a CompactMask as a tensor gets a ValueError that names it, never
a wrong answer.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect

import torch


def _varlen_from_starts(starts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, N - 1) bool, True where a new sequence starts at token 1.. of a row -> (cu_seqlens (n + 1,)
    int32, longest) of the n sequences of all rows laid end to end (each row starts one). On the
    device but for one host sync, which reads n and longest."""
    sequence = torch.nn.functional.pad(starts, (1, 0), value=True).flatten().cumsum(0) - 1  # of each token
    lengths = torch.zeros_like(sequence).index_add_(0, sequence, torch.ones_like(sequence))
    count, longest = torch.stack([sequence[-1] + 1, lengths.max()]).tolist()
    return torch.nn.functional.pad(lengths[:count].cumsum(0, dtype=torch.int32), (1, 0)), longest


def _varlen_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Packed sequences from (B, N) position ids: one starts wherever a position does not follow the
    one before, as in transformers' find_packed_sequence_indices."""
    return _varlen_from_starts(position_ids[:, 1:] != position_ids[:, :-1] + 1)


class MaskUsedAsTensor(ValueError):
    """A model's own code used a CompactMask as a tensor: it reworks the mask, which fastattn
    cannot honour."""


def _user_of_mask() -> str:
    """The innermost module (by its class) whose code is running: the one that touched the mask."""
    for frame in inspect.stack(0)[2:]:
        owner = frame.frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module):
            return type(owner).__name__
    return "the model"


def _refuse(what: str):
    raise MaskUsedAsTensor(
        f"fastattn: {_user_of_mask()} uses the attention mask as a tensor in its own code ({what}), but under "
        f"attn_implementation='fastattn' a layer's mask is fastattn's compact description, not a tensor: "
        f"this model reworks its mask itself, which fastattn cannot honour; use attn_implementation='eager' or 'sdpa'")


@dataclasses.dataclass(frozen=True, eq=False)
class CompactMask:
    """A layer's mask as fastattn's kernel takes it. Query i (of L) sits at key keys - L + i and sees
    the keys that `causal` and `window` allow among the first `keys`, less `padding`; the mask covers
    `kv_length` keys, and key slots past `keys` (an empty static cache's) are seen by no query. Packed
    sequences (sequence_ids set) attend within each sequence. Not a tensor: a model's code that uses
    it as one raises MaskUsedAsTensor."""
    causal: bool
    keys: int
    kv_length: int
    padding: torch.Tensor | None = None  # (B, keys), True = keep; None: no padding
    window: int | None = None  # transformers' sliding_window: causal, w - 1 keys before; else w - 1 either side
    sequence_ids: torch.Tensor | None = None  # (B, N): packed sequences, each token's index in its row

    @functools.cached_property
    def varlen(self) -> tuple[torch.Tensor, int]:
        """(cu_seqlens, longest) of packed sequences, derived once (one host sync) for all layers."""
        return _varlen_from_starts(self.sequence_ids[:, 1:] != self.sequence_ids[:, :-1])

    @property
    def window_size(self) -> tuple[int, int]:
        if self.window is None:
            return (-1, -1)
        return (self.window - 1, 0 if self.causal else self.window - 1)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        _refuse(f"torch.{getattr(func, '__name__', func)}")

    def __getattr__(self, name):  # only for names the dataclass lacks: a tensor's, e.g. .dtype or .shape
        if not name.startswith("__") and hasattr(torch.Tensor, name):
            _refuse(f".{name}")
        raise AttributeError(name)

    def __getitem__(self, index):
        _refuse("indexing")

    def __invert__(self):
        _refuse("~")

    __and__ = __or__ = __add__ = __radd__ = __mul__ = __sub__ = lambda self, other: _refuse("arithmetic")


def _closure(f, factory, *args) -> dict | None:
    """f's closure variables, if `factory` made f; else None."""
    if getattr(f, "__code__", None) is not factory(*args).__code__:
        return None
    return dict(zip(f.__code__.co_freevars, (cell.cell_contents for cell in f.__closure__)))


def _plain_pattern(mask_function) -> tuple[bool, int | None] | None:
    """(causal, window) of a causal or bidirectional mask function, windowed
    (sliding_window_causal_mask_function, sliding_window_bidirectional_mask_function) or not, window
    in transformers' convention (CompactMask.window); None for any other."""
    from transformers import masking_utils as mu

    if mask_function in (mu.causal_mask_function, mu.bidirectional_mask_function):
        return mask_function is mu.causal_mask_function, None
    both = _closure(mask_function, mu.and_masks)
    if both is None or len(both["mask_functions"]) != 2:
        return None
    overlay, base = both["mask_functions"]
    if base is mu.causal_mask_function:
        window = _closure(overlay, mu.sliding_window_overlay, 1)
        width = None if window is None else window["sliding_window"]  # kv > q - w: itself and w - 1 before
    elif base is mu.bidirectional_mask_function and hasattr(mu, "sliding_window_bidirectional_overlay"):
        window = _closure(overlay, mu.sliding_window_bidirectional_overlay, 1)
        width = None if window is None else window["sliding_window"] + 1  # |q - kv| <= w
    else:
        return None
    return (base is mu.causal_mask_function, width) if isinstance(width, int) else None


def _packed(mask_function) -> tuple[torch.Tensor, tuple[bool, int | None]] | None:
    """(sequence ids, pattern) of the mask transformers builds for packed sequences over a plain pattern:
    and_masks(plain, packed_sequence_mask_function(ids)), the plain pattern remapped to position ids
    (remap_positions_for_packed_sequence) where transformers does so; None for any other mask function."""
    from transformers import masking_utils as mu

    both = _closure(mask_function, mu.and_masks)
    if both is None or len(both["mask_functions"]) != 2:
        return None
    plain, same_sequence = both["mask_functions"]
    sequences = _closure(same_sequence, mu.packed_sequence_mask_function, None)
    remap = getattr(mu, "remap_positions_for_packed_sequence", None)
    remapped = None if remap is None else _closure(plain, remap, None, None)
    pattern = _plain_pattern(plain if remapped is None else remapped["mask_function"])
    return None if sequences is None or pattern is None else (sequences["packed_sequence_mask"], pattern)


def fastattn_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                  mask_function=None, attention_mask=None, allow_is_causal_skip: bool = True,
                  allow_is_bidirectional_skip: bool = True, **kwargs):
    """transformers' mask-interface signature. A CompactMask where the pattern is plain (causal or
    bidirectional, windowed or not) over padding: over the whole sequence, or, for a causal pattern,
    queries at the end of their keys (a cache); packed sequences included. Otherwise, or where the
    model asks for the mask materialized, SDPA's 4-D bool mask."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    mask_function = mask_function or causal_mask_function
    offsets_known = isinstance(q_offset, int) and isinstance(kv_offset, int)  # a static cache's is a tensor
    whole = offsets_known and q_offset == 0 and kv_offset == 0 and q_length == kv_length
    packed = _packed(mask_function) if whole and attention_mask is None else None
    pattern = packed[1] if packed else _plain_pattern(mask_function) if offsets_known else None
    keys = q_offset - kv_offset + q_length if offsets_known else 0
    fits = pattern is not None and (whole or (q_length <= keys <= kv_length if pattern[0] else
                                              pattern[1] is None and kv_offset == 0))
    materialize = not (allow_is_causal_skip if pattern and pattern[0] else allow_is_bidirectional_skip)
    if not fits or materialize and not packed:
        # always 4-D: SDPA's None would leave causality to the module's is_causal, which may not say it
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                         allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)
    causal, window = pattern
    keys = keys if causal else kv_length
    padding = None
    if attention_mask is not None:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset:kv_offset + keys].bool()
        padding = None if padding.all() else padding
    return CompactMask(causal, keys, kv_length, padding, window, packed[0] if packed else None)
