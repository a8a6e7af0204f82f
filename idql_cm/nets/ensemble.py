"""Networks of S independent members stacked along a leading member dimension (several seeds in one process).

Every tensor of a stacked net is the member's solo tensor with a leading ``[S]``: ``StackedLinear.weight`` is
``[S, out, in]``, inputs and outputs are ``[S, B, ...]``. The stacked classes keep the solo classes' submodule
names, so ``member_state_dict(k)`` loads into the solo class unchanged, and ``from_members(nets)`` stacks S solo
nets (built under seeds s, s+1, ...) into one. Member k's rows see only member k's weights: every op is
per-member (batched matmul, LayerNorm over the last dim, elementwise activations).

Randomness: a solo update draws its loss noise and then, inside the forward, its dropout masks (block order) from
one generator seeded by ``step_seed``. :class:`MemberGenerators` holds one generator per member; each draw
(``randn``, ``randint``, ``multinomial``, the masks of :class:`MemberDropout`) takes member k's values from member
k's generator, with member k's solo shape, so member k consumes its stream in the solo order.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from idql_cm.nets.critics import TwinQ, ValueNet
from idql_cm.nets.mlp import IDQLMlp


class MemberGenerators:
    """One ``torch.Generator`` per member on ``device``; draws return ``[S, *shape]`` with row k from generator k.

    A generator seeded with ``n`` gives the stream that ``torch.default_generator.manual_seed(n)`` gives on CPU
    (``torch.cuda.manual_seed(n)`` on CUDA), so member k seeded with the solo run's per-update seed draws what the
    solo run draws. Deep copies share the generators (an EMA copy of a stacked net keeps the binding).
    """

    def __init__(self, num_seeds: int, device: torch.device | str = "cpu"):
        if num_seeds < 1:
            raise ValueError(f"MemberGenerators: expected at least one member, found {num_seeds}")
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device) for _ in range(num_seeds)]

    def __len__(self) -> int:
        return len(self.generators)

    def __deepcopy__(self, memo: dict) -> MemberGenerators:
        return self

    def seed_(self, seeds: Sequence[int]) -> MemberGenerators:
        if len(seeds) != len(self.generators):
            raise ValueError(f"MemberGenerators.seed_: expected {len(self.generators)} seeds, found {len(seeds)}")
        for g, s in zip(self.generators, seeds, strict=True):
            g.manual_seed(int(s))
        return self

    def get_state(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.generators]

    def set_state(self, states: Sequence[torch.Tensor]) -> None:
        for g, s in zip(self.generators, states, strict=True):
            g.set_state(s)

    @contextlib.contextmanager
    def fork(self) -> Iterator[None]:
        """Restore every member's state on exit (``torch.random.fork_rng`` per member: CT's shared dropout masks)."""
        states = self.get_state()
        try:
            yield
        finally:
            self.set_state(states)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = torch.empty((len(self), *shape), dtype=dtype, device=self.device)
        for k, g in enumerate(self.generators):
            torch.randn(tuple(shape), generator=g, dtype=dtype, device=self.device, out=out[k])
        return out

    def rand(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = torch.empty((len(self), *shape), dtype=dtype, device=self.device)
        for k, g in enumerate(self.generators):
            torch.rand(tuple(shape), generator=g, dtype=dtype, device=self.device, out=out[k])
        return out

    def randint(self, high: int, shape: Sequence[int]) -> torch.Tensor:
        return torch.stack([torch.randint(high, tuple(shape), generator=g, device=self.device)
                            for g in self.generators])

    def multinomial(self, probs: torch.Tensor, num_samples: int, replacement: bool = True) -> torch.Tensor:
        """``probs``: one distribution ``[n]`` for every member, or ``[S, n]`` one per member -> ``[S, num_samples]``."""
        rows = [probs if probs.ndim == 1 else probs[k] for k in range(len(self))]
        return torch.stack([torch.multinomial(p, num_samples, replacement, generator=g)
                            for p, g in zip(rows, self.generators, strict=True)])

    def dropout_noise(self, like: torch.Tensor, p: float) -> torch.Tensor:
        """``mask / (1 − p)`` shaped like ``like`` ``[S, ...]``, member k's mask drawn as ``nn.Dropout`` draws it
        (``empty_like(x).bernoulli_(1 − p)`` then ``div_(1 − p)``, ATen's CPU dropout) from generator k."""
        noise = torch.empty_like(like)
        for k, g in enumerate(self.generators):
            noise[k].bernoulli_(1 - p, generator=g)
        return noise.div_(1 - p)


# ---------------------------------------------------------------------------------------------------- layers
def _batched(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``layer`` runs one batched kernel over the members (``layer.batched``; None: everywhere but on CPU)."""
    return x.device.type != "cpu" if layer.batched is None else layer.batched


class StackedLinear(nn.Module):
    """S independent ``nn.Linear``: ``weight [S, out, in]``, ``bias [S, out]``; ``[S, B, in] -> [S, B, out]``."""

    batched: bool | None = None  # see set_batched

    def __init__(self, num_seeds: int, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_seeds, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_seeds, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _batched(self, x):
            # member by member: the solo op, bit for bit; on CPU the GEMMs are compute-bound at these widths and bmm's
            # backward is slower than S mm (docs/ensemble-design.md, "two modes")
            return torch.stack([F.linear(xk, wk, bk) for xk, wk, bk in
                                zip(x.unbind(0), self.weight.unbind(0), self.bias.unbind(0), strict=True)])
        # one batched GEMM per layer (on a GPU a launch per member is what stacking saves)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


class StackedLayerNorm(nn.Module):
    """S independent ``nn.LayerNorm(dim)`` over the last dim: ``weight, bias [S, dim]``."""

    batched: bool | None = None  # see set_batched

    def __init__(self, num_seeds: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(num_seeds, dim))
        self.bias = nn.Parameter(torch.zeros(num_seeds, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [S, B, dim]
        if not _batched(self, x):
            # member by member: the solo fused kernel, bit for bit (on CPU the batched form costs twice as much)
            return torch.stack([F.layer_norm(xk, (self.dim,), wk, bk, self.eps) for xk, wk, bk in
                                zip(x.unbind(0), self.weight.unbind(0), self.bias.unbind(0), strict=True)])
        shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (self.dim,)
        # the normalisation, then the per-member affine in one addcmul (its weight/bias gradients are summed over
        # the batch in another order than LayerNorm's fused backward)
        y = F.layer_norm(x, (self.dim,), None, None, self.eps)
        return torch.addcmul(self.bias.view(shape), y, self.weight.view(shape))


class MemberDropout(nn.Module):
    """``nn.Dropout(p)`` per member, with member k's mask drawn from generator k of the bound
    :class:`MemberGenerators` (``rng``, set by ``bind_rng``); a no-op in eval mode or at p = 0, as nn.Dropout."""

    def __init__(self, p: float = 0.1, rng: MemberGenerators | None = None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"MemberDropout: expected p in [0, 1], found {p}")
        self.p, self.rng = float(p), rng

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return x * torch.zeros((), dtype=x.dtype, device=x.device)
        if self.rng is None:
            raise RuntimeError("MemberDropout: training with p > 0 needs member generators (call bind_rng first)")
        return x * self.rng.dropout_noise(x, self.p)


class StackedFourierEmbedding(nn.Module):
    """:class:`~idql_cm.nets.mlp.FourierEmbedding` per member: ``freqs [S, emb/2]``; ``c_noise [S, B] -> [S, B, emb]``."""

    def __init__(self, num_seeds: int, emb_dim: int):
        super().__init__()
        self.register_buffer("freqs", torch.zeros(num_seeds, emb_dim // 2))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        phase = 2 * math.pi * c_noise[..., None] * self.freqs[:, None, :]  # the solo op order
        return torch.cat([phase.cos(), phase.sin()], dim=-1)


# ---------------------------------------------------------------------------------------------------- helpers
def stack_state_dicts(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{key: stack([s[key] for s in states])}``; refuses state dicts with other keys or shapes."""
    keys = list(states[0])
    for k, s in enumerate(states[1:], start=1):
        if list(s) != keys:
            raise ValueError(f"stack_state_dicts: member {k} has keys {sorted(set(s) ^ set(keys))} the others lack")
        bad = [key for key in keys if s[key].shape != states[0][key].shape]
        if bad:
            raise ValueError(f"stack_state_dicts: member {k} differs in shape at {bad[:3]}")
    return {key: torch.stack([s[key] for s in states]) for key in keys}


def unstack_state_dict(state: dict[str, torch.Tensor], member: int) -> dict[str, torch.Tensor]:
    """Member ``member``'s solo state dict from a stacked one (copies, so the result owns its storage)."""
    return {key: v[member].clone() for key, v in state.items()}


def set_batched(module: nn.Module, batched: bool | None) -> None:
    """How the stacked linear and LayerNorm layers of ``module`` run: ``True`` one batched kernel over the members
    (``baddbmm``; LayerNorm then an ``addcmul``), ``False`` the solo op per member (bit-identical to the solo nets),
    ``None`` (default) batched except on CPU, where the GEMMs are compute-bound and the per-member ops are as fast."""
    for m in module.modules():
        if isinstance(m, (StackedLinear, StackedLayerNorm)):
            m.batched = batched


def bind_rng(module: nn.Module, rng: MemberGenerators | None) -> None:
    """Have every :class:`MemberDropout` in ``module`` draw its masks from ``rng``."""
    for m in module.modules():
        if isinstance(m, MemberDropout):
            m.rng = rng


class Stacked(nn.Module):
    """Base of the stacked nets: ``num_seeds``, ``from_members``, ``member_state_dict``, ``member``.

    A subclass sets ``solo`` (the solo class) and builds the solo class's submodules under the same names from the
    solo constructor's arguments (``solo_config``) plus ``num_seeds``.
    """

    solo: type[nn.Module]

    def __init__(self, num_seeds: int, solo_config: dict):
        super().__init__()
        self.num_seeds, self.solo_config = int(num_seeds), dict(solo_config)

    @classmethod
    def config_of(cls, net: nn.Module) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_members(cls, nets: Sequence[nn.Module], rng: MemberGenerators | None = None) -> Stacked:
        """Stack S solo nets of one architecture (copies; member k = ``nets[k]``); ``rng`` binds the dropout."""
        if not nets:
            raise ValueError(f"{cls.__name__}.from_members: expected at least one net")
        bad = [type(n).__name__ for n in nets if not isinstance(n, cls.solo)]
        if bad:
            raise TypeError(f"{cls.__name__}.from_members: expected {cls.solo.__name__} nets, found {bad}")
        configs = [cls.config_of(n) for n in nets]
        if any(c != configs[0] for c in configs):
            raise ValueError(f"{cls.__name__}.from_members: the members differ in architecture: {configs}")
        ref = next(iter(nets[0].parameters()))
        stacked = cls(len(nets), **configs[0]).to(device=ref.device, dtype=ref.dtype)
        stacked.load_state_dict(stack_state_dicts([n.state_dict() for n in nets]))
        stacked.train(nets[0].training)
        bind_rng(stacked, rng)
        return stacked

    def member_state_dict(self, member: int) -> dict[str, torch.Tensor]:
        """A state dict of member ``member`` that ``solo(**solo_config)`` loads (an exact copy)."""
        if not 0 <= member < self.num_seeds:
            raise IndexError(f"{type(self).__name__}: member {member} out of range (0..{self.num_seeds - 1})")
        return unstack_state_dict(self.state_dict(), member)

    def member(self, member: int) -> nn.Module:
        """Member ``member`` as a solo net (a copy, on this net's device, in this net's train / eval mode)."""
        ref = next(iter(self.parameters()))
        net = self.solo(**self.solo_config).to(device=ref.device, dtype=ref.dtype)
        net.load_state_dict(self.member_state_dict(member))
        return net.train(self.training)


# ---------------------------------------------------------------------------------------------------- nets
class StackedResidualBlock(nn.Module):
    """:class:`~idql_cm.nets.mlp.ResidualBlock` per member (the same ``body`` indices)."""

    def __init__(self, num_seeds: int, dim: int, expand: int = 4, dropout: float = 0.1):
        super().__init__()
        self.body = nn.Sequential(
            MemberDropout(dropout),
            StackedLayerNorm(num_seeds, dim),
            StackedLinear(num_seeds, dim, dim * expand),
            nn.Mish(),
            StackedLinear(num_seeds, dim * expand, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class StackedIDQLMlp(Stacked):
    """S members of :class:`~idql_cm.nets.mlp.IDQLMlp`: ``F(x [S,B,A], c_noise [S,B], obs [S,B,O]) -> [S,B,A]``.

    ``config`` is the solo config (what a checkpoint of member k records); dropout masks come from the bound
    :class:`MemberGenerators` in the solo order (block 0, block 1, ...).
    """

    solo = IDQLMlp

    def __init__(self, num_seeds: int, obs_dim: int, act_dim: int, emb_dim: int = 64, hidden_dim: int = 256,
                 n_blocks: int = 3, expand: int = 4, dropout: float = 0.1, fourier_scale: float = 16.0,
                 final_activation: bool = True):
        cfg = dict(obs_dim=obs_dim, act_dim=act_dim, emb_dim=emb_dim, hidden_dim=hidden_dim, n_blocks=n_blocks,
                   expand=expand, dropout=dropout, fourier_scale=fourier_scale, final_activation=final_activation)
        super().__init__(num_seeds, cfg)
        self.obs_dim, self.act_dim, self.config = obs_dim, act_dim, cfg
        S = num_seeds
        self.time_emb = nn.Sequential(
            StackedFourierEmbedding(S, emb_dim),
            StackedLinear(S, emb_dim, 2 * emb_dim),
            nn.Mish(),
            StackedLinear(S, 2 * emb_dim, emb_dim),
        )
        self.inp = StackedLinear(S, act_dim + emb_dim + obs_dim, hidden_dim)
        self.blocks = nn.Sequential(*(StackedResidualBlock(S, hidden_dim, expand, dropout) for _ in range(n_blocks)))
        self.out = nn.Sequential(nn.Mish() if final_activation else nn.Identity(), StackedLinear(S, hidden_dim, act_dim))

    @classmethod
    def config_of(cls, net: IDQLMlp) -> dict:
        return dict(net.config)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        h = self.inp(torch.cat([x, self.time_emb(c_noise), obs], dim=-1))
        return self.out(self.blocks(h))


def _stacked_head(num_seeds: int, in_dim: int, hidden_dim: int) -> nn.Sequential:
    """``critics._head`` per member (the same indices)."""
    return nn.Sequential(
        StackedLinear(num_seeds, in_dim, hidden_dim),
        StackedLayerNorm(num_seeds, hidden_dim),
        nn.Mish(),
        StackedLinear(num_seeds, hidden_dim, hidden_dim),
        StackedLayerNorm(num_seeds, hidden_dim),
        nn.Mish(),
        StackedLinear(num_seeds, hidden_dim, 1),
    )


class StackedTwinQ(Stacked):
    """S members of :class:`~idql_cm.nets.critics.TwinQ`: ``(obs [S,B,O], act [S,B,A]) -> [S,B,1]``."""

    solo = TwinQ

    def __init__(self, num_seeds: int, obs_dim: int, act_dim: int, hidden_dim: int = 256):
        super().__init__(num_seeds, dict(obs_dim=obs_dim, act_dim=act_dim, hidden_dim=hidden_dim))
        self.q1 = _stacked_head(num_seeds, obs_dim + act_dim, hidden_dim)
        self.q2 = _stacked_head(num_seeds, obs_dim + act_dim, hidden_dim)

    @classmethod
    def config_of(cls, net: TwinQ) -> dict:
        # TwinQ records only its input width obs_dim + act_dim, which is all its shapes and forward depend on
        first = net.q1[0]
        return dict(obs_dim=first.in_features, act_dim=0, hidden_dim=first.out_features)

    def both(self, obs: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        oa = torch.cat([obs, act], dim=-1)
        return self.q1(oa), self.q2(oa)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return torch.minimum(*self.both(obs, act))


class StackedValueNet(Stacked):
    """S members of :class:`~idql_cm.nets.critics.ValueNet`: ``obs [S,B,O] -> [S,B,1]``."""

    solo = ValueNet

    def __init__(self, num_seeds: int, obs_dim: int, hidden_dim: int = 256):
        super().__init__(num_seeds, dict(obs_dim=obs_dim, hidden_dim=hidden_dim))
        self.v = _stacked_head(num_seeds, obs_dim, hidden_dim)

    @classmethod
    def config_of(cls, net: ValueNet) -> dict:
        first = net.v[0]
        return dict(obs_dim=first.in_features, hidden_dim=first.out_features)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.v(obs)


def member_mean(x: torch.Tensor, num_seeds: int) -> torch.Tensor:
    """The mean of a batch quantity: a scalar for one member, ``[S]`` (over every dim but the first) for S."""
    return x.mean() if num_seeds == 1 else x.mean(dim=tuple(range(1, x.ndim)))
