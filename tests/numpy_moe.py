"""Plain NumPy loop references for routing and the MoE layer, written independently of moe_jax.

Everything here loops over tokens and experts the way the papers describe the algorithms, so
the vectorized JAX code is checked against something that shares none of its tricks.
"""
import numpy as np


def softmax(x):
  x = np.asarray(x, np.float64)
  z = np.exp(x - x.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def tokens_choose(logits, k, capacity, *, normalize=False, before_drop=True,
                  batch_prioritized=False, valid=None, active_extra=None):
  """Top-k tokens-choose routing of one batch of groups.

  logits [G,S,E]; valid [G,S] bool; active_extra [G,S,k] bool (policy decisions, default all).
  Returns (dispatch [G,S,E,C], combine [G,S,E,C]).
  """
  G, S, E = logits.shape
  probs = softmax(logits)
  valid = np.ones((G, S), bool) if valid is None else valid
  dispatch = np.zeros((G, S, E, capacity))
  combine = np.zeros((G, S, E, capacity))
  for g in range(G):
    choices, gates = [], []
    for s in range(S):
      ranked = np.argsort(-probs[g, s], kind="stable")[:k]
      gate = probs[g, s, ranked].copy()
      if normalize and before_drop:
        gate = gate / gate.sum()
      choices.append(ranked)
      gates.append(gate)
    if batch_prioritized:
      order = sorted(range(S), key=lambda s: -probs[g, s].max())
    else:
      order = list(range(S))
    fill = [0] * E
    kept = np.zeros((S, k), bool)
    slots = np.zeros((S, k), int)
    for j in range(k):
      for s in order:
        if not valid[g, s]:
          continue
        if active_extra is not None and not active_extra[g, s, j]:
          continue
        e = choices[s][j]
        if fill[e] < capacity:
          kept[s, j] = True
          slots[s, j] = fill[e]
          fill[e] += 1
    for s in range(S):
      gate = gates[s].copy()
      if normalize and not before_drop:
        total = sum(gate[j] for j in range(k) if kept[s, j])
        gate = gate / total if total > 0 else gate
      for j in range(k):
        if kept[s, j]:
          e, c = choices[s][j], slots[s, j]
          dispatch[g, s, e, c] = 1.0
          combine[g, s, e, c] = gate[j]
  return dispatch, combine


def experts_choose(logits, capacity, valid=None):
  """Expert choice: each expert takes its top-`capacity` real tokens by probability."""
  G, S, E = logits.shape
  probs = softmax(logits)
  valid = np.ones((G, S), bool) if valid is None else valid
  dispatch = np.zeros((G, S, E, capacity))
  combine = np.zeros((G, S, E, capacity))
  for g in range(G):
    for e in range(E):
      ranked = [s for s in np.argsort(-probs[g, :, e], kind="stable") if valid[g, s]]
      for c, s in enumerate(ranked[:capacity]):
        dispatch[g, s, e, c] = 1.0
        combine[g, s, e, c] = probs[g, s, e]
  return dispatch, combine


def ffn(x, wi, wo, activations=("relu",)):
  """One expert's FFN on a single token vector x [m]; wi a list of [m,h] matrices."""
  acts = {"relu": lambda v: np.maximum(v, 0), "linear": lambda v: v,
          "gelu": lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))}
  h = 1.0
  for w, a in zip(wi, activations):
    h = h * acts[a](x @ w)
  return h @ wo


def moe_layer(x, wi, wo, combine, activations=("relu",)):
  """Token-by-token MoE output for grouped tokens x [G,S,m] given combine weights [G,S,E,C].

  wi: list of [E,m,h]; wo [E,h,m]. Each kept (token, expert) pair adds gate · FFN_e(token).
  """
  G, S, m = x.shape
  y = np.zeros((G, S, m))
  for g in range(G):
    for s in range(S):
      for e in range(combine.shape[2]):
        gate = combine[g, s, e].sum()
        if combine[g, s, e].any():
          y[g, s] += gate * ffn(x[g, s], [w[e] for w in wi], wo[e], activations)
  return y


def load_balance_loss(logits, valid=None, *, k=1, all_tokens=False):
  """E · Σ_e f_e · P_e per group, mean over groups. f counts each token's top-k experts before
  capacity (k=1: the first choice). Over real tokens; all_tokens: over every slot, padding
  choosing nothing with probability 0 (flaxformer), every group counted."""
  G, S, E = logits.shape
  probs = softmax(logits)
  valid = np.ones((G, S), bool) if valid is None else valid
  losses = []
  for g in range(G):
    idx = [s for s in range(S) if valid[g, s]]
    if not idx and not all_tokens:
      continue
    n = S if all_tokens else len(idx)
    f = np.zeros(E)
    P = np.zeros(E)
    for s in idx:
      for e in np.argsort(-probs[g, s], kind="stable")[:k]:
        f[e] += 1.0 / n
      P += probs[g, s] / n
    losses.append(E * float(np.dot(f, P)))
  return float(np.mean(losses))


def router_z_loss(logits, valid=None, *, all_tokens=False):
  """mean(logsumexp(logits)²) over real tokens; all_tokens: over every slot, padding logits
  replaced by zeros (so each adds log(E)²)."""
  logits = np.asarray(logits, np.float64)
  valid = np.ones(logits.shape[:2], bool) if valid is None else np.asarray(valid)
  if all_tokens:
    logits = np.where(valid[..., None], logits, 0.0)
  mx = logits.max(-1)
  lse2 = (mx + np.log(np.exp(logits - mx[..., None]).sum(-1))) ** 2
  return float(lse2.mean() if all_tokens else lse2[valid].mean())
