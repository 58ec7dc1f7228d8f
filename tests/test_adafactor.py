"""Adafactor with logical factor rules against a NumPy reference of the paper's algorithm
(Shazeer & Stern 2018, Alg. 4 with update clipping and relative step size), applied per matrix:
an expert weight [e,m,h] is e independent [m,h] matrices, an attention kernel [m,h,d] is the
matrix [m, h*d], a small or unnamed parameter keeps a full second moment."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moe_jax import adafactor, optimizers, partitioning


class NumpyAdafactor:
  """One matrix (or vector) with the paper's Adafactor: decay 1 - t^-0.8, eps1 1e-30, update
  clipping at RMS 1, relative step size max(1e-3, RMS(x))."""

  def __init__(self, shape, factored):
    self.factored, self.t = factored, 0
    if factored:
      self.r, self.c = np.zeros(shape[0]), np.zeros(shape[1])
    else:
      self.v = np.zeros(shape)

  def direction(self, g, x):
    self.t += 1
    beta = 1.0 - self.t ** -0.8
    g2 = g.astype(np.float64) ** 2 + 1e-30
    if self.factored:
      self.r = beta * self.r + (1 - beta) * g2.mean(axis=1)
      self.c = beta * self.c + (1 - beta) * g2.mean(axis=0)
      v = np.outer(self.r, self.c) / self.r.mean()
    else:
      self.v = beta * self.v + (1 - beta) * g2
      v = self.v
    u = g / np.sqrt(v)
    u = u / max(1.0, np.sqrt(np.mean(u ** 2)))
    return u * max(1e-3, np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def test_each_param_kind_matches_the_per_matrix_reference():
  rng = np.random.default_rng(0)
  e, m, h, heads, d = 3, 16, 24, 4, 8
  shapes = {"expert_wi": (e, m, h), "query": (m, heads, d), "out": (heads, d, m),
            "relpos": (heads, 32), "router": (m, e), "embedding": (200, 160)}
  axes = {"expert_wi": P("expert", "embed", "expert_mlp"), "query": P("embed", "heads", "kv"),
          "out": P("heads", "kv", "embed"), "relpos": P("heads", "unmodeled"),
          "router": P("embed", "unmodeled"), "embedding": P("vocab", "embed")}
  params = {k: rng.normal(scale=0.5, size=s).astype(np.float32) for k, s in shapes.items()}
  # Each param as the reference's matrices: (to matrices, from matrices, factored).
  to_matrix = {
      "expert_wi": (lambda a: [a[j] for j in range(e)], np.stack, True),
      "query": (lambda a: [a.reshape(m, heads * d)], lambda ms: ms[0].reshape(m, heads, d), True),
      "out": (lambda a: [a.reshape(heads * d, m).T],
              lambda ms: ms[0].T.reshape(heads, d, m), True),
      "relpos": (lambda a: [a], lambda ms: ms[0], False),  # 4 < 128: not factored
      "router": (lambda a: [a], lambda ms: ms[0], False),
      "embedding": (lambda a: [a], lambda ms: ms[0], True),  # both >= 128: factored
  }
  refs = {k: [NumpyAdafactor(mat.shape, to_matrix[k][2]) for mat in to_matrix[k][0](params[k])]
          for k in params}
  tx = optimizers.adafactor(axes)
  state = tx.init(jax.tree.map(jnp.asarray, params))
  update = jax.jit(tx.update)
  for _ in range(4):
    grads = {k: rng.normal(size=s).astype(np.float32) * (1 + np.arange(s[-1])) / s[-1]
             for k, s in shapes.items()}
    updates, state = update(jax.tree.map(jnp.asarray, grads), state,
                            jax.tree.map(jnp.asarray, params))
    for k in params:
      split, join, _ = to_matrix[k]
      want = -join([ref.direction(g, x) for ref, g, x in
                    zip(refs[k], split(grads[k]), split(params[k]))])
      np.testing.assert_allclose(np.asarray(updates[k]), want, rtol=2e-5, atol=1e-9, err_msg=k)
      params[k] = params[k] + 0.1 * np.asarray(updates[k])
  # Factored statistics: per expert for [e,m,h]; [m] and [h,d] for an attention kernel.
  _, v_row, v_col, v = state[0]
  assert v_row["expert_wi"].shape == (e, m) and v_col["expert_wi"].shape == (e, h)
  assert v_row["query"].shape == (m,) and v_col["query"].shape == (heads, d)
  assert v_row["out"].shape == (m,) and v_col["out"].shape == (heads, d)
  assert v["relpos"].shape == (heads, 32) and v_row["relpos"].shape == (1,)


def test_state_shardings_follow_the_kept_dimensions():
  part = partitioning.Partitioner(mesh_shape=(2, 2, 2))
  axes = {"wi": P("expert", "embed", "expert_mlp"), "query": P("embed", "heads", "kv")}
  abstract = {"wi": jax.ShapeDtypeStruct((4, 16, 32), jnp.float32),
              "query": jax.ShapeDtypeStruct((16, 4, 8), jnp.float32)}
  shardings = {"wi": jax.sharding.NamedSharding(part.mesh, P("expert", None, "model")),
               "query": jax.sharding.NamedSharding(part.mesh, P(None, "model", None))}
  tx = optimizers.adafactor(axes)
  specs = jax.tree.map(lambda s: s.spec, part.opt_state_shardings(tx, abstract, shardings))
  v_row, v_col = specs[0].v_row, specs[0].v_col
  assert v_row["wi"] == P("expert", None) and v_col["wi"] == P("expert", "model")
  assert v_row["query"] == P(None) and v_col["query"] == P("model", None)


def test_rules_and_errors():
  f = adafactor.factoring((8, 512, 2048), ("expert", "embed", "expert_mlp"))
  assert (f.rows, f.cols, f.averaging) == ((1,), (2,), (1, 2))
  # No names: the classic rule on the two largest dims, whatever the rank.
  assert adafactor.factoring((8, 512, 2048), None).rows == (1,)
  assert not adafactor.factoring((512, 2048), ("embed", "mlp"), factored=False).factored
  with pytest.raises(ValueError, match="no rule for logical axis 'stage'"):
    adafactor.factoring((4, 8, 8), ("stage", "embed", "mlp"))
