"""The EViT model arguments, declared once (``EViTOptions``) and checked in one place
(``EViTOptions.checked``): clear errors, nothing silently clamped. Every family, ``apply``, the
generated ``evit_<timm name>`` registrations, the tools and ``weights/hub.py`` take their names and
defaults from here; a new argument is one field here (and its check in ``checked``)."""
import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    'KeepRate', 'DEFAULT_KEEP_RATE', 'Budget', 'KEEP_ALL', 'budgets_per_block', 'EViTOptions', 'EVIT_ARGS',
    'TRAINING_ARGS', 'pop_evit_args', 'default_reorg_layers',
    'check_keep_rate', 'check_reorg_layers', 'check_fuse_token', 'SCORES', 'check_score', 'resolve_score',
    'FUSIONS', 'APPLY_FUSION', 'check_fusion', 'as_python_number',
]

KeepRate = Union[float, Sequence[float]]

# The paper's keep rate, where keep_rate is not given.
DEFAULT_KEEP_RATE = 0.7

# What ranks the tokens (docs/design.md, "What ranks the tokens"): the class token's attention row,
# the attention each token receives from every query, or the model's own attention-pool query.
SCORES = ('class', 'mean', 'pool')

# How the inattentive tokens are fused (docs/design.md, "A fused token that keeps its size"): the
# paper's raw attention-weighted sum, or the attention-weighted mean that keeps its size.
FUSIONS = ('paper', 'size')
# The fusion of ``apply`` and the generated ``evit_<timm name>`` names, used on timm's weights without
# retraining: measured better than the paper's there (docs/design.md, "A fused token that keeps its
# size"). The paper's names keep EViTOptions.fusion, the paper's (parity with the official code).
APPLY_FUSION = 'size'


class Budget(NamedTuple):
    """One block's token budget (docs/design.md, "Budgets"): the keep rate, every image keeping the
    same count. ``KEEP_ALL`` (rate 1.0) keeps every token. The one type a block's budget travels
    in, from the model's arguments and a call's overrides to the block: a new kind of budget is a
    field here."""
    keep_rate: float = 1.0

    @property
    def reorganises(self) -> bool:
        """Whether the block may change its tokens (the one place that says so)."""
        return self.keep_rate < 1.0


KEEP_ALL = Budget()


def budgets_per_block(keep_rate: KeepRate, num_reorg_layers: int) -> Tuple[Budget, ...]:
    """One ``Budget`` per reorganising block from the public argument ``keep_rate`` (one float, or
    one per block; checked)."""
    return tuple(Budget(rate) for rate in check_keep_rate(keep_rate, num_reorg_layers))


def default_reorg_layers(depth: int) -> Tuple[int, ...]:
    """The paper's relative places: blocks ``depth // 4, depth // 2, 3 * depth // 4`` (3, 6, 9 of 12);
    none for a model without blocks (timm builds one)."""
    if depth <= 0:
        return ()
    return tuple(sorted({depth // 4, depth // 2, 3 * depth // 4}))


@dataclass(frozen=True)
class EViTOptions:
    """The creation arguments only EViT has (every other argument describes the timm architecture),
    with their defaults. As given: ``checked(depth)`` validates them against a model's depth.

    Fields marked ``training`` in their metadata only act in training (the keep-rate warm-up)."""
    keep_rate: Optional[KeepRate] = None            # one float in (0, 1] or one per block; None: 0.7
    reorg_layers: Optional[Sequence[int]] = None    # None: default_reorg_layers(depth)
    fuse_token: bool = True                         # fuse the inattentive tokens (True) or drop them
    score: Optional[str] = None                     # one of SCORES; None: the model's default (resolve_score)
    fusion: str = 'paper'                           # one of FUSIONS (with fuse_token; without it every size is 1)
    keep_rate_warmup_start: int = dataclasses.field(default=0, metadata={'training': True})
    keep_rate_warmup_steps: int = dataclasses.field(default=0, metadata={'training': True})

    def checked(self, depth: int) -> 'EViTOptions':
        """The options checked for a model of ``depth`` blocks, resolved: ``reorg_layers`` a tuple
        of block indices (the default places for None), and one float per reorganising block in
        ``keep_rate`` (``budgets()`` gives them as budgets). A TypeError or ValueError names the
        argument otherwise."""
        steps = {}
        for name in TRAINING_ARGS:
            value = as_python_number(getattr(self, name))
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f'{name} must be an integer >= 0 (optimizer steps), got {value!r}')
            steps[name] = int(value)
        layers = default_reorg_layers(depth) if self.reorg_layers is None else check_reorg_layers(self.reorg_layers, depth)
        fuse_token = check_fuse_token(self.fuse_token)
        score = None if self.score is None else check_score(self.score)
        keep_rate = DEFAULT_KEEP_RATE if self.keep_rate is None else self.keep_rate
        rates = tuple(b.keep_rate for b in budgets_per_block(keep_rate, len(layers)))
        return dataclasses.replace(self, keep_rate=rates, reorg_layers=layers, fuse_token=fuse_token, score=score,
                                   fusion=check_fusion(self.fusion), **steps)

    def budgets(self) -> Tuple[Budget, ...]:
        """One ``Budget`` per reorganising block, of checked options."""
        return budgets_per_block(self.keep_rate, len(self.reorg_layers))


# The EViT arguments by name, in declaration order; those that act only in training.
EVIT_ARGS: Tuple[str, ...] = tuple(f.name for f in dataclasses.fields(EViTOptions))
TRAINING_ARGS: Tuple[str, ...] = tuple(f.name for f in dataclasses.fields(EViTOptions) if f.metadata.get('training'))


def pop_evit_args(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """EViT's arguments taken out of ``kwargs`` (which keeps the architecture's), as given."""
    return {name: kwargs.pop(name) for name in EVIT_ARGS if name in kwargs}


def check_score(score) -> str:
    if not isinstance(score, str) or score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(map(repr, SCORES))}, got {score!r}")
    return score


def check_fusion(fusion) -> str:
    if not isinstance(fusion, str) or fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {', '.join(map(repr, FUSIONS))}, got {fusion!r}")
    return fusion


def resolve_score(score: Optional[str], has_class_token: bool, has_attention_pool: bool) -> str:
    """The score a model uses: ``score`` checked against what the model has. ``None``: the default,
    measured (docs/design.md, "What ranks the tokens"): ``'class'`` where a class token exists, else
    ``'pool'`` where an attention pool does, else ``'mean'``. A score the model cannot serve is
    refused naming what it lacks."""
    if score is None:
        return 'class' if has_class_token else 'pool' if has_attention_pool else 'mean'
    score = check_score(score)
    if score == 'class' and not has_class_token:
        raise ValueError("score='class' needs a class token, and this model has none (class_token=False): "
                         "use score='mean'" + (" or score='pool'" if has_attention_pool else ''))
    if score == 'pool' and not has_attention_pool:
        raise ValueError("score='pool' needs timm's attention-pool head (AttentionPoolLatent, global_pool='map'), "
                         "and this model has none: use score='mean'" + (" or score='class'" if has_class_token else ''))
    return score


def as_python_number(value: Any) -> Any:
    """A number as timm users hold them: a 0-d tensor (not a boolean one) as its Python value;
    numpy's scalars are numbers already (``numbers.Real`` / ``Integral``). Anything else as given."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and value.dtype != torch.bool:
        return value.item()
    return value


def _check_one_rate(value, name: str) -> float:
    value = as_python_number(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f'{name} must be a float in (0, 1], got {value!r} of type {type(value).__name__}')
    value = float(value)
    if math.isnan(value) or not 0. < value <= 1.:
        raise ValueError(f'{name} must be in (0, 1], got {value!r}')
    return value


def _per_block(value: KeepRate, num_reorg_layers: int, name: str) -> Tuple[float, ...]:
    """One float in (0, 1] per reorganising block, from a single value or a per-block sequence;
    errors name the argument ``name``."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_reorg_layers:
            raise ValueError(
                f'{name} has {len(value)} values but there are {num_reorg_layers} reorganising '
                f'blocks (reorg_layers); give one float in (0, 1] or exactly {num_reorg_layers}')
        return tuple(_check_one_rate(v, f'{name}[{i}]') for i, v in enumerate(value))
    return (_check_one_rate(value, name),) * num_reorg_layers


def check_keep_rate(keep_rate: KeepRate, num_reorg_layers: int) -> Tuple[float, ...]:
    """One keep rate per reorganising block, from a single rate or a per-block sequence."""
    return _per_block(keep_rate, num_reorg_layers, 'keep_rate')


def check_reorg_layers(reorg_layers: Sequence[int], depth: int) -> Tuple[int, ...]:
    """Zero-based block indices, strictly increasing, each in ``[0, depth)``."""
    if isinstance(reorg_layers, (str, bytes)) or not isinstance(reorg_layers, Sequence):
        raise TypeError(f'reorg_layers must be a sequence of block indices, got {reorg_layers!r}')
    reorg_layers = [as_python_number(layer) for layer in reorg_layers]
    for layer in reorg_layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f'reorg_layers must hold integer block indices, got {layer!r} in {reorg_layers!r}')
        if not 0 <= layer < depth:
            raise ValueError(f'reorg_layers entry {layer} is out of range: blocks are 0..{depth - 1}')
    layers = tuple(int(layer) for layer in reorg_layers)
    if any(a >= b for a, b in zip(layers, layers[1:])):
        raise ValueError(f'reorg_layers must be strictly increasing without duplicates, got {layers}')
    return layers


def check_fuse_token(fuse_token) -> bool:
    if not isinstance(fuse_token, bool):
        raise TypeError(f'fuse_token must be True or False, got {fuse_token!r}')
    return fuse_token
