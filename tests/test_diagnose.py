"""scripts/diagnose.py's per-group norms against hand-computed NumPy values."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
import diagnose  # pylint: disable=wrong-import-position


def test_group_norms_per_group_and_per_ffn():
  rng = np.random.default_rng(0)
  shapes = {"encoder/layers_0/mlp/wi": (4, 6), "encoder/layers_0/mlp/wo": (6, 4),
            "encoder/layers_1/mlp/wi": (3, 4, 6), "encoder/layers_1/mlp/wo": (3, 6, 4),
            "encoder/layers_1/mlp/router/w": (4, 3),
            "encoder/layers_0/attention/query": (4, 2, 2), "token_embedder/embedding": (10, 4)}
  grads = {k: rng.normal(size=s) for k, s in shapes.items()}
  before = {k: rng.normal(size=s) for k, s in shapes.items()}
  after = {k: v + 0.01 * rng.normal(size=v.shape) for k, v in before.items()}
  out = diagnose.group_norms(grads, before, after)
  assert set(out) == {"dense_ffn", "expert_ffn", "router", "attention", "embedding"}
  wi, wo = "encoder/layers_1/mlp/wi", "encoder/layers_1/mlp/wo"
  expert_grad = [np.sqrt(np.sum(grads[wi][e] ** 2) + np.sum(grads[wo][e] ** 2)) for e in range(3)]
  np.testing.assert_allclose(out["expert_ffn"]["grad_norm_per_ffn"], np.mean(expert_grad))
  np.testing.assert_allclose(out["expert_ffn"]["grad_norm"],
                             np.sqrt(np.sum(grads[wi] ** 2) + np.sum(grads[wo] ** 2)))
  update = [np.sqrt((np.sum((after[wi][e] - before[wi][e]) ** 2)
                     + np.sum((after[wo][e] - before[wo][e]) ** 2))
                    / (np.sum(before[wi][e] ** 2) + np.sum(before[wo][e] ** 2))) for e in range(3)]
  np.testing.assert_allclose(out["expert_ffn"]["relative_update_per_ffn"], np.mean(update))
  dense = ["encoder/layers_0/mlp/wi", "encoder/layers_0/mlp/wo"]
  np.testing.assert_allclose(out["dense_ffn"]["grad_norm_per_ffn"],
                             np.sqrt(sum(np.sum(grads[k] ** 2) for k in dense)))
  router = "encoder/layers_1/mlp/router/w"
  np.testing.assert_allclose(out["router"]["relative_update"],
                             np.linalg.norm(after[router] - before[router])
                             / np.linalg.norm(before[router]))
