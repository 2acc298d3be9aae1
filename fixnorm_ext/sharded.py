"""FusedFixNorm on sharded parameters: DTensors, as ``fully_shard`` (FSDP2)
makes them, or built by hand.

A norm is a sum over the whole segment, so a segment cut across ranks (a
whole-tensor norm of a tensor sharded on any dimension) is stepped without
its rescale, its local sum of squares goes into one float64 vector with
every other such sum, the vector is summed across the ranks by one
all-reduce (per process group; FSDP2 has one), and the segment is rescaled
by the factor of the global norm. A ``norm_dim=0`` tensor sharded on dim 0
has its rows whole on each rank: it is stepped and rescaled locally, with
the slice of its targets that this rank holds, and needs no collective.
Replicated placements need none either.

With ``track_stats=True`` the sums of the angle travel in the same vector:
for a cut segment its four sums, for a tensor whose rows are spread over
the ranks three per-tensor partials (see ``dispatch.segment_partials``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from fixnorm_ext import dispatch
from fixnorm_ext.dispatch import SUM_COLS, GroupHyper

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    def is_dtensor(t) -> bool:
        return isinstance(t, DTensor)
except ImportError:  # torch built without distributed support
    dist = DTensor = Shard = None

    def is_dtensor(t) -> bool:
        return False


@dataclass(frozen=True)
class Placement:
    """How one parameter is laid out for the step."""
    group: Optional[object]   # the process group its segments are summed over; None: all local
    cut: bool                 # its whole-tensor segment is cut across the ranks of `group`
    spread: bool              # norm_dim=0 rows, whole on each rank but not all on one
    row_offset: int           # first global row held here (norm_dim=0)


def _shard_dims(p) -> list[tuple[int, int]]:
    """(mesh dim, tensor dim) of each placement that really splits ``p``."""
    out = []
    for mesh_dim, placement in enumerate(p.placements):
        if placement.is_partial():
            raise ValueError(f"a DTensor parameter of shape {tuple(p.shape)} has a Partial placement: "
                             "FusedFixNorm needs Shard or Replicate parameters")
        if placement.is_shard() and p.device_mesh.size(mesh_dim) > 1:
            out.append((mesh_dim, placement.dim))
    return out


def placement_of(p, hyper: GroupHyper) -> Placement:
    """Where ``p``'s segments live (ValueError for a layout the step cannot
    sum: a parameter split over two mesh dimensions, or norm_dim=0 rows cut
    by a shard of another dimension)."""
    if not is_dtensor(p):
        return Placement(None, False, False, 0)
    dims = _shard_dims(p)
    if not dims:
        return Placement(None, False, False, 0)
    if len(dims) > 1:
        raise ValueError(f"a DTensor parameter of shape {tuple(p.shape)} is sharded over {len(dims)} mesh "
                         f"dimensions {p.placements}: FusedFixNorm supports one sharded mesh dimension")
    mesh_dim, dim = dims[0]
    group = p.device_mesh.get_group(mesh_dim)
    rows = hyper.norm is not None and hyper.norm_dim == 0 and p.dim() > 0
    if rows and dim != 0:
        raise ValueError(f"a norm_dim=0 parameter of shape {tuple(p.shape)} is sharded on dim {dim}, which "
                         "cuts its rows: shard it on dim 0 (fully_shard's default) so that whole rows live "
                         "on each rank")
    if rows:
        return Placement(group, False, True, _row_offset(p))
    return Placement(group, True, False, 0)


def _row_offset(p) -> int:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return int(offset[0]) if offset else 0


def local(t):
    """The tensor this rank holds (shares memory: writes reach the DTensor).
    The DTensor's own local tensor where it has one: ``to_local()`` makes a
    new alias object at every call, which would defeat every table the
    backends keep per tensor identity."""
    if not is_dtensor(t):
        return t
    held = getattr(t, "_local_tensor", None)
    return held if isinstance(held, torch.Tensor) else t.to_local()


def initial_target(p, norm_dim: Optional[int]) -> torch.Tensor:
    """The norms ``p`` has now, per segment (float64): a plain 0-d tensor for
    a whole-tensor norm (the same on every rank), and for norm_dim=0 a
    DTensor of the rows' norms placed like ``p``'s rows."""
    x = local(p).detach().to(torch.float64)
    placement = placement_of(p, GroupHyper(lr=0.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                                           maximize=False, norm="fixed", norm_dim=norm_dim))
    rows = x.reshape(x.shape[0], math.prod(x.shape[1:])) if x.dim() else x  # (0, k) on a rank without rows
    if placement.spread:
        norms = torch.linalg.vector_norm(rows, dim=1)
        return DTensor.from_local(norms, p.device_mesh, p.placements, run_check=False, shape=(p.shape[0],),
                                  stride=(1,))
    if norm_dim == 0 and p.dim() > 0:  # replicated rows
        return torch.linalg.vector_norm(rows, dim=1)
    sq = x.square().sum()
    if placement.group is not None:
        dist.all_reduce(sq, group=placement.group)
    return sq.sqrt()


def _local_target(target, placement: Placement, rows: int):
    if target is None or isinstance(target, float):
        return target
    if is_dtensor(target):
        return local(target)
    if placement.spread and target.dim() == 1:
        return target[placement.row_offset:placement.row_offset + rows]
    return target


def _python_sums(before: Optional[torch.Tensor], after: torch.Tensor, segs: int) -> torch.Tensor:
    """The four sums of the ``sums`` table (float64, [segs, 4]) of a step
    taken from ``before`` to ``after``; without ``before``, the squares only
    (the other three columns 0)."""
    width = after.numel() // segs if segs else 0
    new = after.detach().to(torch.float64).reshape(segs, width)
    if before is None:
        return torch.nn.functional.pad(new.square().sum(1, keepdim=True), (0, SUM_COLS - 1))
    old = before.detach().to(torch.float64).reshape(segs, width)
    delta = new - old
    return torch.stack([new.square().sum(1), old.square().sum(1), (old * delta).sum(1), delta.square().sum(1)], 1)


def sharded_step(params, grads, bufs, *, positions, idle, group_index, groups, targets, backend, grad_scale,
                 found_inf, workspace, track_stats):
    """One FusedFixNorm step over parameters of which some are DTensors.
    Returns the momentum buffers after the step (DTensors where the
    parameter is one) and, with ``track_stats``, each tensor's angle.

    ``positions`` are the stepped parameters' places among all of the
    optimizer's, and ``idle`` the ``(position, parameter, group)`` of its
    DTensor parameters without a gradient here. The all-reduced vector has
    the same layout on every rank whatever gradients a rank holds: an idle
    parameter sends its weights' squares as they are and is not rescaled, so
    a rank without gradients still takes part (no hang) and the entries of
    two ranks never mismatch. A tensor with gradients on some ranks only is
    stepped and rescaled on those, by the factor of its whole norm, and left
    as it is on the others: its norm is then not held. FSDP2 gives every
    rank the gradients of the same parameters."""
    if not params:
        _idle_collectives(idle, groups, workspace, track_stats)
        return [], (torch.zeros(0, dtype=torch.float64) if track_stats else None)
    placements = _placements(params, group_index, groups, workspace)
    lp = [local(p) for p in params]
    lg = [local(g) for g in grads]
    lb = [None if b is None else local(b) for b in bufs]
    cut = [pl.cut and groups[gi].norm is not None for pl, gi in zip(placements, group_index)]
    # Cut segments are stepped as plain SGD here and rescaled below; the
    # others are stepped whole, with this rank's targets.
    plain = {gi: GroupHyper(**{**groups[gi].__dict__, "norm": None, "norm_dim": None})
             for gi, c in zip(group_index, cut) if c}
    hypers = list(groups) + list(plain.values())
    plain_index = {gi: len(groups) + k for k, gi in enumerate(plain)}
    step_index = [plain_index[gi] if c else gi for gi, c in zip(group_index, cut)]
    step_targets = [None if c else _local_target(t, pl, p.shape[0] if p.dim() else 1)
                    for t, c, pl, p in zip(targets, cut, placements, lp)]
    in_kernel = backend in dispatch.SUMS_BACKENDS
    layout = dispatch.cached_sums_layout(lp, lb, group_index=step_index, groups=hypers, targets=step_targets,
                                         workspace=workspace)
    sums = None
    if in_kernel and (track_stats or any(cut)):
        sums = torch.empty((layout.rows, SUM_COLS), dtype=torch.float64)
    # Without the kernel's sums, Python measures them after the step: the
    # squares of the cut segments, and for track_stats everything against a
    # copy of the weights before it.
    before = {i: lp[i].detach().clone() for i in range(len(lp))} if track_stats and not in_kernel else {}
    new_bufs = dispatch.fixnorm_step(lp, lg, lb, group_index=step_index, groups=hypers, targets=step_targets,
                                     backend=backend, grad_scale=grad_scale, found_inf=found_inf,
                                     workspace=workspace, sums=sums)
    if sums is not None:
        factors = dispatch.rescale_factors(sums[:, 0], layout)
    else:
        # Python's sums: of the finished step (rescaled: factor 1), and of
        # the unscaled update for cut segments; zeros where none is needed.
        starts = layout.starts
        sums = torch.cat([_python_sums(before.get(i), lp[i], starts[i + 1] - starts[i]) if track_stats or cut[i]
                          else torch.zeros(starts[i + 1] - starts[i], SUM_COLS, dtype=torch.float64)
                          for i in range(len(lp))])
        factors = torch.ones(sums.shape[0], dtype=torch.float64)

    # The one vector per process group: per cut segment its squares (and,
    # tracked, its other three sums); tracked, per spread or cut-free
    # sharded tensor its three partials.
    first_row = layout.starts
    vectors: dict = {}
    for i, (pl, c) in enumerate(zip(placements, cut)):
        if pl.group is None:
            continue
        row = first_row[i]
        if c or (track_stats and not pl.spread):
            part = sums[row] if track_stats else sums[row, :1]
            vectors.setdefault(pl.group, []).append((positions[i], "segment", i, part))
        elif track_stats and pl.spread:
            n = first_row[i + 1] - row
            partial = dispatch.segment_partials(sums[row:row + n], factors[row:row + n],
                                                torch.zeros(n, dtype=torch.int64), 1)[0]
            vectors.setdefault(pl.group, []).append((positions[i], "partial", i, partial))
    for group, entry in _idle_entries(idle, groups, workspace, track_stats):
        vectors.setdefault(group, []).append(entry)
    combined = _all_reduce(vectors)

    # Rescale the cut segments by the factor of their global norm, as the
    # kernels do (1 after a step skipped for an overflow: the kernel's sums
    # are zeros then, and with Python's the weights did not move).
    cut_index = [i for i, c in enumerate(cut) if c]
    if cut_index:
        squares = torch.stack([combined[i][1][0] for i in cut_index])
        # Their modes and targets (one segment each), kept while they stay the same.
        cut_layout = dispatch.cached_sums_layout(
            [lp[i] for i in cut_index], [lb[i] for i in cut_index], group_index=[group_index[i] for i in cut_index],
            groups=groups, targets=[targets[i] for i in cut_index], workspace=workspace.setdefault("cut", {}))
        cut_factors = dispatch.rescale_factors(squares, cut_layout)
        if found_inf is not None and bool(found_inf.item()):
            cut_factors = torch.ones_like(cut_factors)
        by_kind: dict = {}
        for i, f in zip(cut_index, cut_factors.tolist()):
            factors[first_row[i]] = f
            if f != 1.0:
                entry = by_kind.setdefault((lp[i].device, lp[i].dtype), ([], []))
                entry[0].append(lp[i])
                entry[1].append(f)
        for tensors, scalars in by_kind.values():
            torch._foreach_mul_(tensors, scalars)  # in the math type of the dtype, as the kernels

    # Buffers made by this step are local tensors: place them like their
    # parameter (the others are the state's own DTensors, stepped in place).
    out_bufs = [_like_param(nb, p) if b is None else nb for nb, b, p in zip(new_bufs, bufs, params)]
    if not track_stats:
        return out_bufs, None
    partials = dispatch.segment_partials(sums, factors, layout.tensor, len(params))
    for i, (kind, got) in combined.items():
        if kind == "partial":
            partials[i] = got
        else:
            seg = got.reshape(1, SUM_COLS)
            partials[i] = dispatch.segment_partials(seg, factors[first_row[i]:first_row[i] + 1],
                                                    torch.zeros(1, dtype=torch.int64), 1)[0]
    return out_bufs, dispatch.angles_from_partials(partials)


def _idle_entries(idle, groups, workspace, track_stats) -> list:
    """What the idle parameters put in the vector: ``(group, entry)`` pairs,
    each entry as the stepped ones' (position, kind, None, values)."""
    out = []
    placements = _placements([p for _, p, _ in idle], [gi for _, _, gi in idle], groups, workspace)
    for (position, p, gi), pl in zip(idle, placements):
        if pl.group is None:
            continue
        cut = pl.cut and groups[gi].norm is not None
        sq = local(p).detach().to(torch.float64).square().sum().reshape(1).cpu()
        if cut or (track_stats and not pl.spread):
            values = torch.cat([sq, sq, torch.zeros(2, dtype=torch.float64)]) if track_stats else sq
            out.append((pl.group, (position, "segment", None, values)))
        elif track_stats and pl.spread:
            out.append((pl.group, (position, "partial", None, torch.cat([torch.zeros(2, dtype=torch.float64), sq]))))
    return out


def _idle_collectives(idle, groups, workspace, track_stats) -> None:
    """A rank with no gradient at all still takes its part in the step's all-reduces."""
    vectors: dict = {}
    for group, entry in _idle_entries(idle, groups, workspace, track_stats):
        vectors.setdefault(group, []).append(entry)
    _all_reduce(vectors)


def _all_reduce(vectors: dict) -> dict:
    """One all-reduce per process group of its entries' values, in the order
    of their positions (the same on every rank); returns {tensor index:
    (kind, summed values)} for the entries of stepped tensors."""
    combined: dict = {}
    for group, entries in vectors.items():
        entries.sort(key=lambda e: e[0])
        flat = torch.cat([e[3] for e in entries])
        device = _group_device(group)
        flat = flat.to(device)
        dist.all_reduce(flat, group=group)
        flat = flat.cpu()
        pos = 0
        for _, kind, i, part in entries:
            if i is not None:
                combined[i] = (kind, flat[pos:pos + part.numel()])
            pos += part.numel()
    return combined


def _group_device(group) -> torch.device:
    """Where a collective of ``group`` takes its tensors: the CPU for gloo,
    this rank's GPU for NCCL."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _placements(params, group_index, groups, workspace) -> list[Placement]:
    """:func:`placement_of` for each parameter, kept in ``workspace`` per
    parameter and norm setting (a DTensor keeps its placement)."""
    cache = workspace.setdefault("placements", {})
    out = []
    for p, gi in zip(params, group_index):
        h = groups[gi]
        key = (id(p), h.norm is not None, h.norm_dim)
        hit = cache.get(key)
        if hit is None or hit[0] is not p:
            hit = cache[key] = (p, placement_of(p, h))
        out.append(hit[1])
    return out


def _like_param(buf, p):
    """A momentum buffer placed like its parameter (a DTensor for a DTensor)."""
    if buf is None or not is_dtensor(p) or is_dtensor(buf):
        return buf
    return DTensor.from_local(buf, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
