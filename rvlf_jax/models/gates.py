"""The gate policy of RLA blocks (`rvlf_jax.models.rla`): state -> MLP -> a distribution over
the gate a in [0, 1].

Shape vocabulary: B batch (examples), G gates drawn at once (B per example, or 1 per episode),
T visual tokens, M text tokens, D model dim, O policy outputs.

The state of one RLA layer is [GAP(visual); GAP(text); cos(GAP(visual), GAP(text))], float[2D + 1],
with GAP the mean over (valid) tokens. A small MLP (`GatePolicy`) maps it to O outputs, which a
gate distribution reads:

  'beta'         O = 1: p = sigmoid(out), a ~ Beta(k p, k (1 - p)), k = 10 by default; a is the gate
                 itself. The default, as in the DVLA-RL paper.
  'categorical'  O = 3: logits over the gate values (1.0, 0.5, 0.0), as the released checkpoints;
                 the action is the index, the gate its value.

Distributions are frozen dataclasses with pure, jittable methods, registered by name, so another
gate (say, a Kumaraswamy) is one more registration:

  sample(rng, out_go) -> action_g     log_prob(out_go, action_g) -> float[G]
  entropy(out_go) -> float[G]         gate(action_g) -> float[G] in [0, 1]
  mode(out_go) -> float[G]            the deterministic gate for evaluation
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.scipy import special

from rvlf_jax.models import layers
from rvlf_jax.rl import registry

Array = jax.Array

GATES = registry.Registry('gate distribution')
register = GATES.register
get = GATES.get

# Samples of a Beta with a small concentration can round to exactly 0 or 1 in float32, where the
# log-density is infinite; log_prob evaluates them this far inside the interval.
BETA_EPS = 1e-6


def masked_mean(x_btd: Array, mask_bt: Array | None = None) -> Array:
  """float32[B, D]: the mean over tokens (GAP), over the valid ones when a mask is given."""
  x = x_btd.astype(jnp.float32)
  if mask_bt is None:
    return x.mean(axis=1)
  w_bt = mask_bt.astype(jnp.float32)
  return jnp.einsum('btd,bt->bd', x, w_bt) / jnp.maximum(w_bt.sum(axis=1), 1.0)[:, None]


def cosine(x_bd: Array, y_bd: Array, eps: float = 1e-8) -> Array:
  """float32[B]: cosine similarity of matching rows."""
  x, y = x_bd.astype(jnp.float32), y_bd.astype(jnp.float32)
  num = jnp.sum(x * y, axis=-1)
  return num / jnp.maximum(jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1), eps)


def policy_state(visual_gap_bd: Array, text_gap_bd: Array) -> Array:
  """float32[B, 2D + 1]: [GAP(visual); GAP(text); cos(GAP(visual), GAP(text))]."""
  cos_b1 = cosine(visual_gap_bd, text_gap_bd)[:, None]
  return jnp.concatenate([visual_gap_bd.astype(jnp.float32), text_gap_bd.astype(jnp.float32),
                          cos_b1], axis=-1)


class GatePolicy(nn.Module):
  """state float[G, S] -> Dense(hidden) -> GELU -> ... -> Dense(num_outputs): float32[G, O].

  The last layer starts at zero, so a fresh policy is uniform over the categorical values and
  has p = 0.5 for the Beta gate: training starts from no preference.

  Attributes:
    num_outputs: O, the distribution's `num_outputs`.
    hidden: widths of the hidden layers.
  """

  num_outputs: int
  hidden: tuple[int, ...] = (64,)

  @nn.compact
  def __call__(self, state_gs: Array) -> Array:
    x = state_gs.astype(jnp.float32)
    for i, width in enumerate(self.hidden):
      x = jax.nn.gelu(layers.Linear((x.shape[-1],), (width,), (None, 'mlp'), use_bias=True,
                                    name=f'hidden_{i}')(x))
    return layers.Linear((x.shape[-1],), (self.num_outputs,), ('mlp', None), use_bias=True,
                         kernel_init=nn.initializers.zeros_init(), name='out')(x)


def draw_gate(module: nn.Module, config: 'GateConfig', state_gs: Array,
              name: str) -> tuple[Array, Array, Array]:
  """(gate, log_prob, entropy) float32[G] of the policy `name`, created in `module`'s scope.

  With a 'gate' rng in `module` the action is sampled (its log-probability differentiable in the
  policy, the action itself not); without one the gate is the policy's mode and log_prob is 0.
  The caller passes a stop-gradient state, so the policy never trains the encoder. A fixed gate
  (`config.fixed`) creates no policy and has zero log_prob and entropy.
  """
  if config.fixed is not None:
    zeros_g = jnp.zeros(state_gs.shape[:1], jnp.float32)
    return jnp.full_like(zeros_g, config.fixed), zeros_g, zeros_g
  dist = config.distribution
  out_go = GatePolicy(dist.num_outputs, config.hidden, parent=module, name=name)(state_gs)
  entropy_g = dist.entropy(out_go)
  if not module.has_rng('gate'):
    return dist.mode(out_go), jnp.zeros_like(entropy_g), entropy_g
  action_g = jax.lax.stop_gradient(dist.sample(module.make_rng('gate'),
                                               jax.lax.stop_gradient(out_go)))
  return dist.gate(action_g), dist.log_prob(out_go, action_g), entropy_g


def beta_log_prob(a: Array, alpha: Array, beta: Array) -> Array:
  """log Beta(a; alpha, beta) = (alpha - 1) log a + (beta - 1) log(1 - a) - log B(alpha, beta)."""
  return ((alpha - 1.0) * jnp.log(a) + (beta - 1.0) * jnp.log1p(-a) -
          special.betaln(alpha, beta))


def beta_entropy(alpha: Array, beta: Array) -> Array:
  """Differential entropy of Beta(alpha, beta) in nats (negative when concentrated):
  log B(alpha, beta) - (alpha - 1) psi(alpha) - (beta - 1) psi(beta)
  + (alpha + beta - 2) psi(alpha + beta)."""
  return (special.betaln(alpha, beta) - (alpha - 1.0) * special.digamma(alpha) -
          (beta - 1.0) * special.digamma(beta) +
          (alpha + beta - 2.0) * special.digamma(alpha + beta))


@register('beta')
@dataclasses.dataclass(frozen=True)
class BetaGate:
  """a ~ Beta(k p, k (1 - p)) with p = sigmoid(out[..., 0]): mean p, spread set by k.

  Attributes:
    concentration: k = alpha + beta (10 in the paper); larger is less exploratory.
  """

  concentration: float = 10.0
  num_outputs = 1

  def params(self, out_go: Array) -> tuple[Array, Array]:
    """(alpha, beta) float32[G] of the Beta."""
    p = jax.nn.sigmoid(out_go[..., 0].astype(jnp.float32))
    return self.concentration * p, self.concentration * (1.0 - p)

  def sample(self, rng: Array, out_go: Array) -> Array:
    alpha, beta = self.params(out_go)
    return jax.random.beta(rng, alpha, beta)

  def log_prob(self, out_go: Array, action_g: Array) -> Array:
    alpha, beta = self.params(out_go)
    return beta_log_prob(jnp.clip(action_g, BETA_EPS, 1.0 - BETA_EPS), alpha, beta)

  def entropy(self, out_go: Array) -> Array:
    return beta_entropy(*self.params(out_go))

  def gate(self, action_g: Array) -> Array:
    return action_g.astype(jnp.float32)

  def mode(self, out_go: Array) -> Array:
    """The Beta's mean p (its mode is not defined for alpha or beta < 1)."""
    return jax.nn.sigmoid(out_go[..., 0].astype(jnp.float32))


@register('categorical')
@dataclasses.dataclass(frozen=True)
class CategoricalGate:
  """action ~ Categorical(softmax(out)); gate = values[action].

  Attributes:
    values: the gate values, one per output (1.0 pure cross, 0.5 even mix, 0.0 pure self).
  """

  values: tuple[float, ...] = (1.0, 0.5, 0.0)

  @property
  def num_outputs(self) -> int:
    return len(self.values)

  def sample(self, rng: Array, out_go: Array) -> Array:
    return jax.random.categorical(rng, out_go.astype(jnp.float32), axis=-1)

  def log_prob(self, out_go: Array, action_g: Array) -> Array:
    logp_go = jax.nn.log_softmax(out_go.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_go, action_g[..., None].astype(jnp.int32), axis=-1)[..., 0]

  def entropy(self, out_go: Array) -> Array:
    logp_go = jax.nn.log_softmax(out_go.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp_go) * logp_go, axis=-1)

  def gate(self, action_g: Array) -> Array:
    return jnp.asarray(self.values, jnp.float32)[action_g]

  def mode(self, out_go: Array) -> Array:
    return self.gate(jnp.argmax(out_go, axis=-1))


@dataclasses.dataclass(frozen=True)
class GateConfig:
  """How an RLA layer chooses its gate.

  Attributes:
    kind: a registered distribution ('beta' or 'categorical').
    concentration: k of the Beta gate.
    values: the categorical gate's values.
    hidden: the policy MLP's hidden widths.
    scope: 'episode' (one gate per call: the state pools over the whole batch, which is one
      episode; the paper's "one scalar per layer per episode") or 'example' (one gate per example).
    fixed: a constant gate in [0, 1] instead of a policy (the static `a = 0.5` ablation), or None.
  """

  kind: str = 'beta'
  concentration: float = 10.0
  values: tuple[float, ...] = (1.0, 0.5, 0.0)
  hidden: tuple[int, ...] = (64,)
  scope: str = 'episode'
  fixed: float | None = None

  def __post_init__(self):
    if self.kind not in GATES:
      raise ValueError(f'Unknown gate kind {self.kind!r}; registered: {GATES.names()}.')
    if self.scope not in ('episode', 'example'):
      raise ValueError(f"scope must be 'episode' or 'example', got {self.scope!r}.")
    if self.fixed is not None and not 0.0 <= self.fixed <= 1.0:
      raise ValueError(f'A fixed gate must lie in [0, 1], got {self.fixed}.')
    if self.concentration <= 0:
      raise ValueError(f'concentration must be positive, got {self.concentration}.')

  @property
  def distribution(self):
    """The gate distribution object (`BetaGate`, `CategoricalGate`, or another registered one
    built with no arguments)."""
    if self.kind == 'beta':
      return BetaGate(self.concentration)
    if self.kind == 'categorical':
      return CategoricalGate(self.values)
    return get(self.kind)()
