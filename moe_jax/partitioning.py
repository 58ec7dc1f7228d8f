"""Device mesh, logical axis rules and shardings for params, optimizer state and batches.

The mesh has three axes, ('data', 'expert', 'model'). Modules name their array dimensions with
t5x logical axis names (`nn.with_logical_partitioning` for params, `nn.with_logical_constraint`
for activations); `DEFAULT_RULES` maps those names to mesh axes. With the defaults, expert
weights [e,m,h] live on P('expert', None, 'model'), the batch and the MoE groups are split over
data × expert, and the expert-side buffers [e,g,c,m] over 'expert' (e) and 'data' (g), so the
MoE layer's change of layout is one all-to-all each way.
"""
from __future__ import annotations

import itertools
import math
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
import optax
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P


MESH_AXES = ("data", "expert", "model")

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# t5x-compatible logical axis names -> mesh axes. Order matters: the first rule whose mesh axes
# are still free in an array wins.
DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "expert")),
    ("length", None),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("joined_kv", "model"),
    ("vocab", "model"),
    ("expert", "expert"),
    ("expert_mlp", "model"),
    ("expert_replicas", "data"),
    ("unmodeled", None),
)

# Environment variables read by initialize_multihost when its arguments are not given.
ENV_COORDINATOR = "MOE_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "MOE_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MOE_JAX_PROCESS_ID"


def parse_mesh(text: str) -> tuple[int, int, int]:
  """'data:32,expert:8,model:1' -> (32, 8, 1). Missing axes are 1."""
  sizes = dict.fromkeys(MESH_AXES, 1)
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, sep, value = part.partition(":")
    if not sep or name not in sizes or not value.isdigit() or int(value) < 1:
      raise ValueError(f"mesh={text!r}: expected 'data:N,expert:N,model:N', got {part!r}")
    sizes[name] = int(value)
  return tuple(sizes[a] for a in MESH_AXES)  # type: ignore[return-value]


def _as_shape(mesh_shape: Sequence[int] | Mapping[str, int] | str) -> tuple[int, int, int]:
  """(data, expert, model) sizes from a tuple, a dict or 'data:2,expert:4,model:1'."""
  if isinstance(mesh_shape, str):
    return parse_mesh(mesh_shape)
  if isinstance(mesh_shape, Mapping):
    unknown = set(mesh_shape) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"mesh_shape has unknown axes {sorted(unknown)}; axes are {MESH_AXES}")
    shape = tuple(int(mesh_shape.get(a, 1)) for a in MESH_AXES)
  else:
    shape = tuple(int(s) for s in mesh_shape)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"mesh_shape={shape} must be 3 positive sizes (data, expert, model)")
  return shape  # type: ignore[return-value]


def _mesh_shape(num_devices: int, num_expert_partitions: int, num_model_partitions: int,
                mesh_shape: Sequence[int] | Mapping[str, int] | str | None) -> tuple[int, int, int]:
  """(data, expert, model) sizes for `num_devices`; one-line ValueError when they don't fit."""
  if mesh_shape is not None:
    shape = _as_shape(mesh_shape)
    if math.prod(shape) != num_devices:
      raise ValueError(f"mesh_shape={shape} has {math.prod(shape)} devices but "
                       f"{num_devices} devices are in use")
    return shape
  for name, value in (("num_expert_partitions", num_expert_partitions),
                      ("num_model_partitions", num_model_partitions)):
    if value < 1:
      raise ValueError(f"{name}={value} must be >= 1")
  per_replica = num_expert_partitions * num_model_partitions
  if num_devices % per_replica:
    raise ValueError(
        f"num_expert_partitions={num_expert_partitions} x num_model_partitions="
        f"{num_model_partitions} = {per_replica} does not divide the {num_devices} devices")
  return num_devices // per_replica, num_expert_partitions, num_model_partitions


def _spec_entries(spec: P, ndim: int) -> list[Any]:
  """PartitionSpec -> one entry per dimension (None where unsharded)."""
  entries = list(spec) + [None] * (ndim - len(spec))
  return entries[:ndim]


def _axes_of(entry: Any) -> tuple[str, ...]:
  if entry is None or entry is P.UNCONSTRAINED:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def shard_shape(shape: Sequence[int], spec: P, mesh_sizes: Mapping[str, int]) -> tuple[int, ...]:
  """Per-device shape of an array of `shape` laid out as `spec` (ceil: XLA pads uneven shards)."""
  entries = _spec_entries(spec, len(shape))
  return tuple(-(-d // math.prod(mesh_sizes[a] for a in _axes_of(e)))
               for d, e in zip(shape, entries))


def _path_names(path: Sequence[Any]) -> tuple[str, ...]:
  """Tree path -> tuple of names, one kind of key as good as another (dict, attr, index)."""
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return tuple(names)


def _derived_spec(param_shape: tuple[int, ...], param_spec: P, leaf_shape: tuple[int, ...]) -> P:
  """Spec of an optimizer-state leaf that belongs to a param.

  Same shape: the param's spec. Fewer dimensions (Adafactor's factored v_row / v_col: an expert
  weight [e,m,h] keeps [e,m] and [e,h], an attention kernel [m,h,d] keeps [m] and [h,d]): the
  param's spec without the reduced dimensions. Which dimensions were reduced is read off the
  shapes; when several choices give the same shape (runs of equal sizes), any of their mesh
  axes divides it: keep the choice that stays most sharded.
  Anything else (counts, placeholders of shape [1]) is replicated.
  """
  entries = _spec_entries(param_spec, len(param_shape))
  if leaf_shape == param_shape:
    return P(*entries)
  dropped = len(param_shape) - len(leaf_shape)
  candidates = []
  if dropped > 0:
    for gone in itertools.combinations(range(len(param_shape)), dropped):
      kept = [i for i in range(len(param_shape)) if i not in gone]
      if tuple(param_shape[i] for i in kept) == leaf_shape:
        candidates.append([entries[i] for i in kept])
  if candidates:
    return P(*max(candidates, key=lambda c: sum(e is not None for e in c)))
  return P()


def _normalize_rules(rules: LogicalRules) -> tuple:
  # gin hands over lists; flax wants tuples of mesh axes.
  return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in rules)


@gin.configurable
class Partitioner:
  """Builds the ('data', 'expert', 'model') mesh and turns logical names into shardings.

  Attributes:
    num_expert_partitions: size of the 'expert' mesh axis (experts are split over it).
    num_model_partitions: size of the 'model' mesh axis (d_ff, heads, vocab split over it).
    mesh_shape: explicit (data, expert, model) sizes, a dict, or 'data:2,expert:4,model:1';
      overrides the two above. The product must equal the number of devices.
    logical_axis_rules: logical axis name -> mesh axes (DEFAULT_RULES).
    devices: devices to use (default: all of jax.devices(), every process's).

  gin: `Partitioner.num_expert_partitions = 8` (data takes the remaining devices).
  """

  def __init__(self, num_expert_partitions: int = 1, num_model_partitions: int = 1,
               mesh_shape: Sequence[int] | Mapping[str, int] | str | None = None,
               logical_axis_rules: LogicalRules = DEFAULT_RULES,
               devices: Sequence[jax.Device] | None = None):
    devices = list(jax.devices() if devices is None else devices)
    shape = _mesh_shape(len(devices), num_expert_partitions, num_model_partitions, mesh_shape)
    auto = (jax.sharding.AxisType.Auto,) * 3  # with_sharding_constraint needs Auto axes
    self.mesh: Mesh | AbstractMesh = jax.make_mesh(shape, MESH_AXES, axis_types=auto,
                                                   devices=devices)
    self.rules = _normalize_rules(logical_axis_rules)

  @classmethod
  def abstract(cls, mesh_shape: Sequence[int] | Mapping[str, int] | str,
               logical_axis_rules: LogicalRules = DEFAULT_RULES) -> "Partitioner":
    """A partitioner over an AbstractMesh of any size (no devices): shardings and planning
    only, e.g. 256 or 2048 devices on one machine."""
    self = cls.__new__(cls)
    auto = (jax.sharding.AxisType.Auto,) * 3
    self.mesh = AbstractMesh(_as_shape(mesh_shape), MESH_AXES, axis_types=auto)
    self.rules = _normalize_rules(logical_axis_rules)
    return self

  @property
  def mesh_sizes(self) -> dict[str, int]:
    """{'data': D, 'expert': X, 'model': M}."""
    return dict(zip(self.mesh.axis_names, self.mesh.axis_sizes))

  @property
  def num_expert_partitions(self) -> int:
    return self.mesh_sizes["expert"]

  # ---- logical names -> shardings -------------------------------------------------------------

  def logical_to_mesh_spec(self, names: Sequence[str | None] | None) -> P:
    """('batch', 'length', 'embed') -> PartitionSpec of mesh axes."""
    if names is None:
      return P()
    return nn.logical_to_mesh_axes(tuple(names), self.rules)

  def logical_to_sharding(self, tree: Any) -> Any:
    """Tree of logical PartitionSpecs (or name tuples) -> tree of NamedShardings."""
    return jax.tree.map(lambda s: NamedSharding(self.mesh, self.logical_to_mesh_spec(s)), tree,
                        is_leaf=lambda x: isinstance(x, (P, tuple)) or x is None)

  def _check_divisible(self, path: str, shape: tuple[int, ...], spec: P) -> None:
    sizes = self.mesh_sizes
    for dim, entry in zip(shape, _spec_entries(spec, len(shape))):
      n = math.prod(sizes[a] for a in _axes_of(entry))
      if dim % n:
        raise ValueError(f"{path}: dimension of size {dim} is sharded over mesh axes "
                         f"{_axes_of(entry)} of size {n}, which does not divide it; "
                         "change the mesh or the logical_axis_rules")

  def params_shardings(self, abstract_variables: Any) -> Any:
    """Abstract variables whose leaves carry flax logical partitioning metadata (the output of
    jax.eval_shape of an init with nn.with_logical_partitioning params) -> NamedSharding tree
    shaped like the unboxed variables. Unboxed leaves are replicated."""
    specs = nn.get_partition_spec(abstract_variables)
    values = nn.unbox(abstract_variables)
    flat, treedef = jax.tree_util.tree_flatten_with_path(values)
    spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
    out = []
    for (path, leaf), logical in zip(flat, spec_leaves):
      spec = self.logical_to_mesh_spec(tuple(logical))
      self._check_divisible(jax.tree_util.keystr(path), tuple(leaf.shape), spec)
      out.append(NamedSharding(self.mesh, spec))
    return jax.tree_util.tree_unflatten(treedef, out)

  def opt_state_shardings(self, optimizer: optax.GradientTransformation, params: Any,
                          params_shardings: Any = None) -> Any:
    """NamedSharding tree for `optimizer.init(params)`, for any optax state.

    params: the tree the optimizer is initialised with: abstract or real, boxed (logical
      metadata) or plain. params_shardings: their shardings (default: from the boxes).
    Each state leaf is matched to a param by tree path (the longest suffix of the leaf's path
    that is a param's path); it takes the param's spec, minus the reduced dimension for
    Adafactor's factored statistics (v_row / v_col of an expert weight [e,m,h] keep 'expert').
    Leaves that match no param (counts, scalars) are replicated.
    """
    if params_shardings is None:
      params_shardings = self.params_shardings(params)
    values = nn.unbox(params)
    param_leaves = jax.tree_util.tree_flatten_with_path(values)[0]
    sharding_leaves = jax.tree_util.tree_leaves(params_shardings)
    by_path = {_path_names(path): (tuple(leaf.shape), s.spec)
               for (path, leaf), s in zip(param_leaves, sharding_leaves)}
    abstract_state = jax.eval_shape(optimizer.init, values)

    def leaf_sharding(path, leaf):
      names = _path_names(path)
      for i in range(len(names)):
        if names[i:] in by_path:
          shape, spec = by_path[names[i:]]
          return NamedSharding(self.mesh, _derived_spec(shape, spec, tuple(leaf.shape)))
      return NamedSharding(self.mesh, P())

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)

  def data_sharding(self, ndim: int) -> NamedSharding:
    """Sharding of a batch array [b, ...]: b over the mesh axes of 'batch' (data × expert)."""
    return NamedSharding(self.mesh, self.logical_to_mesh_spec(("batch",) + (None,) * (ndim - 1)))

  @property
  def batch_partitions(self) -> int:
    """How many ways the batch dimension is split (data × expert by default)."""
    return math.prod(self.mesh_sizes[a] for a in _axes_of(self.data_sharding(1).spec[0]))

  # ---- checks ---------------------------------------------------------------------------------

  def validate(self, *, num_experts: int | None = None, batch_size: int | None = None,
               num_groups: int | None = None) -> None:
    """One-line ValueError naming the setting that does not fit the mesh. Call before
    compiling; batch_size is the global batch."""
    x = self.num_expert_partitions
    if num_experts is not None and num_experts % x:
      raise ValueError(f"num_experts={num_experts} is not divisible by the {x} expert "
                       "partitions (num_expert_partitions / mesh 'expert' axis)")
    if batch_size is not None:
      n = self.batch_partitions
      if batch_size % n:
        raise ValueError(f"batch_size={batch_size} (global) is not divisible by the {n} batch "
                         f"partitions (mesh data x expert = {self.mesh_sizes['data']} x {x})")
      if batch_size % jax.process_count():
        raise ValueError(f"batch_size={batch_size} (global) is not divisible by the "
                         f"{jax.process_count()} processes")
    if num_groups is not None and num_groups % x:
      raise ValueError(f"num_groups={num_groups} is not a multiple of the {x} expert "
                       "partitions (set MoeLayer.num_expert_partitions to the mesh 'expert' size)")

  # ---- running --------------------------------------------------------------------------------

  def jit(self, fn: Callable, in_shardings: Any = None, out_shardings: Any = None,
          donate_argnums: int | Sequence[int] = (),
          static_argnums: int | Sequence[int] = ()) -> "MeshJitted":
    """jax.jit with explicit shardings (None: left to the compiler), traced and run under the
    mesh and the logical axis rules, so nn.with_logical_constraint in modules takes effect."""
    if isinstance(self.mesh, AbstractMesh):
      raise ValueError("an abstract Partitioner (no devices) can plan but not run")
    kwargs: dict[str, Any] = {"donate_argnums": donate_argnums, "static_argnums": static_argnums}
    if in_shardings is not None:
      kwargs["in_shardings"] = in_shardings
    if out_shardings is not None:
      kwargs["out_shardings"] = out_shardings
    return MeshJitted(jax.jit(fn, **kwargs), self.mesh, self.rules)

  def initialize(self, init_fn: Callable[..., Any], *args: Any) -> Any:
    """Run `init_fn(*args)` (e.g. module.init or model.get_initial_variables) with every
    variable created directly in its sharding: no full copy on one device. Returns the
    unboxed variables. Array arguments (rngs) are traced; anything else (shapes) is static."""
    is_array = [isinstance(a, (jax.Array, np.ndarray)) for a in args]
    arrays = [a for a, flag in zip(args, is_array) if flag]

    def call(*array_args):
      it = iter(array_args)
      return init_fn(*[next(it) if flag else a for a, flag in zip(args, is_array)])

    shardings = self.params_shardings(jax.eval_shape(call, *arrays))
    return self.jit(lambda *a: nn.unbox(call(*a)), out_shardings=shardings)(*arrays)

  def shard_batch(self, local_batch: Any) -> Any:
    """This process's rows of the global batch (tree of numpy arrays [b_local, ...]) -> global
    jax.Arrays [b_local * processes, ...] sharded like data_sharding."""
    def put(x):
      x = np.asarray(x)
      rows = x.shape[0] * jax.process_count()
      if rows % self.batch_partitions:
        raise ValueError(f"global batch of {rows} rows ({x.shape[0]} per process) is not "
                         f"divisible by the {self.batch_partitions} batch partitions")
      return jax.make_array_from_process_local_data(self.data_sharding(x.ndim), x)
    return jax.tree.map(put, local_batch)


# Several processes wait here for the slowest one to compile a function (seconds to minutes
# apart on a loaded machine) before its first run.
COMPILE_BARRIER_TIMEOUT_S = 3600


class MeshJitted:
  """A jitted function that traces, lowers and runs under its mesh and logical axis rules.

  With several processes, each new input signature is compiled first and all processes meet
  at a barrier of the distributed runtime before running it: the first collective of a
  program sets up its communicators with a short deadline (CPU gloo: 30 s), which a process
  still compiling would miss.
  """

  def __init__(self, jitted: Any, mesh: Mesh, rules: LogicalRules):
    self.jitted, self.mesh, self.rules = jitted, mesh, rules
    self._compiled_signatures: set[Any] = set()

  def __call__(self, *args, **kwargs):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      if jax.process_count() > 1:
        self._compile_together(args, kwargs)
      return self.jitted(*args, **kwargs)

  def _compile_together(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    leaves, treedef = jax.tree.flatten((args, kwargs))
    signature = (treedef, tuple((np.shape(x), str(getattr(x, "dtype", type(x))))
                                for x in leaves))
    if signature in self._compiled_signatures:
      return
    self.jitted.lower(*args, **kwargs).compile()  # jit's cache keeps it for the call
    _barrier(f"moe_jax compiled {getattr(self.jitted, '__name__', 'fn')} "
             f"#{next(_BARRIER_COUNT)}")
    self._compiled_signatures.add(signature)

  def lower(self, *args, **kwargs):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.jitted.lower(*args, **kwargs)


_BARRIER_COUNT = itertools.count()


def _barrier(name: str) -> None:
  """All processes meet here (the distributed runtime's barrier: no device collective)."""
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  distributed.global_state.client.wait_at_barrier(name, COMPILE_BARRIER_TIMEOUT_S * 1000)


@gin.configurable
def initialize_multihost(coordinator_address: str | None = None,
                         num_processes: int | None = None, process_id: int | None = None,
                         auto_detect: bool = False) -> bool:
  """Start jax.distributed before any other JAX call; returns whether it was started.

  Arguments default to $MOE_JAX_COORDINATOR ('host:port'), $MOE_JAX_NUM_PROCESSES and
  $MOE_JAX_PROCESS_ID. With none of them set: auto_detect=True calls
  jax.distributed.initialize() with no arguments (Cloud TPU pods, SLURM, ... fill them in);
  otherwise this is a single-process run and nothing happens. CPU processes talk over gloo.
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id is None and os.environ.get(ENV_PROCESS_ID):
    process_id = int(os.environ[ENV_PROCESS_ID])
  given = (coordinator_address, num_processes, process_id)
  # Only affects the CPU backend; without it CPU devices of different processes can't talk.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if all(v is None for v in given):
    if not auto_detect:
      return False
    jax.distributed.initialize()
    return True
  if any(v is None for v in given):
    raise ValueError("initialize_multihost needs coordinator_address, num_processes and "
                     f"process_id together (or ${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES}, "
                     f"${ENV_PROCESS_ID}); got {given}")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  return True
