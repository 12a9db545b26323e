"""Device meshes and logical-axis sharding, on JAX's own machinery (``jax.set_mesh`` + Auto axes).

Parameters carry **logical** axis names as NNX metadata (``nnx.Param(x, logical_axes=("embed",
"mlp"))``); activations are named at block boundaries with :func:`constrain`. :data:`DEFAULT_RULES`
map logical names to the mesh axes ``data``, ``fsdp``, ``tensor`` and ``seq``:

- the batch splits over ``data`` × ``fsdp``, the sequence over ``seq``;
- ``fsdp`` also splits every parameter's ``embed`` dimension (ZeRO-3: XLA all-gathers a layer's weights
  just before use and reduce-scatters its gradients), and ``tensor`` splits heads, MLP channels and the
  vocabulary (Megatron-style: the residual stream stays whole over ``tensor``).

Everything is a no-op without a mesh, so single-device code pays nothing. A dimension that the mesh
axes do not divide stays unsharded on them (e.g. 3 KV heads on a tensor axis of 2): correct, and the
memory report shows the cost.

Usage::

    mesh = sharding.make_mesh(MeshConfig(fsdp=2, tensor=2, seq=2))
    with jax.set_mesh(mesh):
        model = Llama(config, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        sharding.shard(model, optimizer)           # place the state per the rules
        metrics = step(model, optimizer, sharding.shard_batch(batch))
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from tokensparse.config import MESH_AXES, MeshConfig

# Logical name → mesh axes (None: replicated). Parameter names first, then activation names.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("batch", ("data", "fsdp")),
    ("length", "seq"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
)

_rules: list[tuple] = [DEFAULT_RULES]

BATCH_AXES = ("batch", "length")


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all) with axes (data, fsdp, tensor, seq), all ``Auto``:
    XLA propagates shardings from the parameters, the batch and :func:`constrain` hints."""
    config = config or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    shape = config.shape(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices[:math.prod(shape)])


@contextlib.contextmanager
def axis_rules(rules: Sequence[tuple]) -> Iterator[None]:
    """Use ``rules`` (logical name → mesh axes) instead of :data:`DEFAULT_RULES` inside the block;
    applies when a function is traced, so wrap the first call of a jitted step."""
    _rules.append(tuple(rules))
    try:
        yield
    finally:
        _rules.pop()


def current_mesh():
    """The mesh set by ``jax.set_mesh`` (concrete or, while tracing, abstract); None if none is set."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def axis_size(name: str) -> int:
    """Size of mesh axis ``name`` in the current mesh (1 without a mesh or without that axis)."""
    mesh = current_mesh()
    if mesh is None or name not in mesh.axis_names:
        return 1
    return int(mesh.shape[name])


def seq_shards() -> int:
    """How many contiguous pieces the sequence is split into (the ``seq`` axis size)."""
    return axis_size("seq")


def route_shards(configured: int = 0) -> int:
    """Sequence pieces token routing selects in: ``configured`` if set, else the ``seq`` axis size.

    Setting it explicitly reproduces a sequence-sharded run's selections on one device (and keeps
    them when the mesh changes)."""
    return configured if configured > 0 else seq_shards()


def zigzag_order(seq_len: int, shards: int, multiple: int = 1) -> np.ndarray:
    """The zig-zag sequence layout: the positions to place at each array slot, so that contiguous
    shard s of S holds chunks s and 2S-1-s of 2S equal chunks.

    Under causal attention a query attends to the keys before it, so with a contiguous split the last
    shard does ~2S-1 times the first's work; paired early and late chunks give every shard the same
    amount. ``multiple`` (e.g. LeMo's block size) must divide the chunk length so blocks stay whole.
    """
    if shards == 1:
        return np.arange(seq_len)
    chunk, rest = divmod(seq_len, 2 * shards)
    if rest or chunk % multiple:
        raise ValueError(f"the zig-zag layout splits the sequence ({seq_len}) into {2 * shards} equal "
                         f"chunks{f' of whole {multiple}-token blocks' if multiple > 1 else ''}; "
                         "change seq_len or the seq axis.")
    chunks = np.arange(seq_len).reshape(2 * shards, chunk)
    return np.concatenate([np.concatenate([chunks[s], chunks[2 * shards - 1 - s]])
                           for s in range(shards)])


def seq_pieces(x: jax.Array, shards: int, inner: Sequence[str | None] = ()) -> jax.Array:
    """[B, T, ...] viewed as [B, shards, T/shards, ...], the pieces laid out over ``seq`` so that
    per-piece work (a ``vmap`` over axis 1) stays on each piece's devices. ``inner`` names the
    trailing dimensions (default: unsplit)."""
    b, t = x.shape[:2]
    if t % shards:
        raise ValueError(f"a sequence of {t} cannot be split into {shards} equal pieces.")
    rest = (*inner, *([None] * (x.ndim - 2 - len(inner))))
    return constrain(x.reshape(b, shards, t // shards, *x.shape[2:]), ("batch", "length", None, *rest))


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh=None,
                    rules: Sequence[tuple] | None = None) -> PartitionSpec:
    """The PartitionSpec for an array of ``shape`` whose dimensions have logical ``names``.

    A mesh axis is used at most once (first dimension wins); axes of size 1 are dropped; a dimension
    the mesh axes do not divide stays unsharded.
    """
    mesh = mesh if mesh is not None else current_mesh()
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match an array of rank {len(shape)}.")
    table = dict(rules if rules is not None else _rules[-1])
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape, strict=True):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if mesh is not None and a in mesh.axis_names and a not in used
                     and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes):
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; identity without a mesh."""
    mesh = current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh)))


def for_use(names: Sequence[str | None]) -> tuple[str | None, ...]:
    """A parameter's logical ``names`` as the computation uses it: the ``embed`` (FSDP) split
    gathered, every other split kept (ZeRO-3 gathers a weight's model dimension, never activations)."""
    return tuple(None if name == "embed" else name for name in names)


def gather_for_use(x: jax.Array, names: Sequence[str | None] | None) -> jax.Array:
    """Parameter value ``x`` (logical ``names``) laid out per :func:`for_use`: an all-gather over
    ``fsdp`` when the mesh splits its model dimension, whose transpose is a reduce-scatter. Identity
    without a mesh or ``names``."""
    return x if names is None else constrain(x, for_use(names))


def gathered_on_use(x: jax.Array, names: Sequence[str | None] | None) -> bool:
    """Whether :func:`gather_for_use` moves data: a mesh splits ``x``'s model dimension."""
    mesh = current_mesh()
    if mesh is None or names is None:
        return False
    return logical_to_spec(names, x.shape, mesh) != logical_to_spec(for_use(names), x.shape, mesh)


def variable_spec(variable: nnx.Variable, mesh=None) -> PartitionSpec:
    """A variable's PartitionSpec from its ``logical_axes`` metadata (replicated without it)."""
    names = variable.get_metadata().get("logical_axes")
    shape = np.shape(variable.get_value())
    if names is None:
        return PartitionSpec()
    return logical_to_spec(names, shape, mesh)


def state_shardings(tree, mesh: Mesh | None = None):
    """NamedShardings for every variable of an NNX module / optimizer / state (same structure as
    ``nnx.state(tree)``). Optimizer moments inherit their parameter's logical axes."""
    mesh = mesh if mesh is not None else _concrete_mesh()
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
    return jax.tree.map(lambda v: NamedSharding(mesh, variable_spec(v, mesh)), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard(*modules, mesh: Mesh | None = None) -> None:
    """Place the state of each module / optimizer on ``mesh`` (default: the current one) per the
    rules, in place. Call after building the optimizer so its moments are placed too."""
    mesh = mesh if mesh is not None else _concrete_mesh()
    for module in modules:
        state = nnx.state(module)
        nnx.update(module, jax.device_put(state, state_shardings(state, mesh)))


def to_local(*modules, mesh: Mesh | None = None) -> None:
    """Replace every variable of each module by its whole value on this process's first device, in
    place. With several processes no process can read another's shards, and a computation on
    global arrays must run on every process; afterwards each process can read, export or evaluate
    the module alone (e.g. only process 0 writes an export). Every process must call it (the gather
    is a collective over ``mesh``, default: the current one)."""
    mesh = mesh if mesh is not None else _concrete_mesh()
    for module in modules:
        whole = jax.device_put(nnx.state(module), NamedSharding(mesh, PartitionSpec()))
        nnx.update(module, jax.tree.map(lambda x: x.addressable_data(0), whole))


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (e.g. until process 0 has written the
    files the others read next); a no-op with one process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (a collective: every process must call it, at the
    same point); ``flag`` itself with one process. Decisions that start collectives (save a
    checkpoint and stop on a signal that reached only some processes) must be taken together."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, dtype=np.int32))))


def constrain_state(*modules) -> None:
    """Inside a jitted step: pin each module's variables to their rule shardings, so updated
    parameters and optimizer state come out sharded as they went in. Identity without a mesh."""
    mesh = current_mesh()
    if mesh is None:
        return
    for module in modules:
        for _, variable in nnx.iter_graph(module):
            if isinstance(variable, nnx.Variable) and variable.get_metadata().get("logical_axes"):
                spec = variable_spec(variable, mesh)
                variable.set_value(jax.lax.with_sharding_constraint(
                    variable.get_value(), NamedSharding(mesh, spec)))


def batch_sharding(shape: Sequence[int], mesh: Mesh | None = None) -> NamedSharding:
    """Batch arrays [B, T, ...] split over the batch axes and ``seq``."""
    mesh = mesh if mesh is not None else _concrete_mesh()
    names = (*BATCH_AXES, *([None] * (len(shape) - 2)))[:len(shape)]
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh))


def shard_batch(batch, mesh: Mesh | None = None):
    """Every array field of ``batch`` as a global array split per :func:`batch_sharding`.

    With several processes, each passes its *process-local* rows (see :func:`process_rows`): the global
    batch is their concatenation in process order.
    """
    mesh = mesh if mesh is not None else _concrete_mesh()

    def place(x):
        if x is None:
            return None
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        return jax.make_array_from_process_local_data(batch_sharding(global_shape, mesh), x,
                                                      global_shape)

    return jax.tree.map(place, batch)


def process_rows(global_batch_size: int) -> slice:
    """The rows of a global batch this process loads (contiguous, in process order)."""
    n = jax.process_count()
    if global_batch_size % n:
        raise ValueError(f"the batch size {global_batch_size} must be divisible by the number of "
                         f"processes ({n}).")
    per = global_batch_size // n
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


class ShardedBatches:
    """A deterministic batch source (``.batch(step)``) fed to a mesh: each process keeps only its
    rows (:func:`process_rows`) and they become one global array per :func:`batch_sharding`. Other
    attributes pass through (e.g. ``steps_per_epoch``)."""

    def __init__(self, batches, mesh: Mesh):
        self.batches, self.mesh = batches, mesh

    def batch(self, step: int):
        batch = self.batches.batch(step)
        rows = process_rows(len(batch.tokens))
        return shard_batch(jax.tree.map(lambda x: np.asarray(x)[rows], batch), self.mesh)

    def __getattr__(self, name):
        return getattr(self.batches, name)


def _concrete_mesh() -> Mesh:
    mesh = jax.sharding.get_mesh() if hasattr(jax.sharding, "get_mesh") else None
    if mesh is None or mesh.empty:
        raise ValueError("no mesh: pass mesh=..., or call inside `with jax.set_mesh(mesh):`.")
    return mesh
