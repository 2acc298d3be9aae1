"""``FusedFixNorm``: a drop-in replacement for ``torch.optim.SGD`` with FixNorm's norm control."""
from __future__ import annotations

import logging
import math
from typing import Optional, Union

import torch
from torch.optim import Optimizer

from fixnorm_ext import reference, sharded
from fixnorm_ext.diagnostics import angles
from fixnorm_ext.dispatch import (BACKENDS, NORM_MODES, SUM_COLS, SUMS_BACKENDS, GroupHyper, angles_from_sums,
                                  cached_sums_layout, fixnorm_step, resolve_backend)

log = logging.getLogger("fixnorm_ext")

# Hyperparameters FixNorm adds to SGD's; a checkpoint that lacks them (one
# saved by torch.optim.SGD) keeps the values the optimizer was built with.
_FIXNORM_KEYS = ("norm", "target_norm", "norm_dim")


SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _scalar(value, name: str) -> float:
    """A hyperparameter given as a number or a one-element tensor, as a float."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a one-element tensor, got {type(value).__name__} {value!r}")
    return float(value)


def _check_param(p) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"FusedFixNorm params must be tensors, got {type(p).__name__}")
    if torch.is_complex(p):
        raise ValueError("FusedFixNorm does not support complex parameters (view them as real with torch.view_as_real)")
    if p.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"FusedFixNorm supports float32, float64, bfloat16 and float16 parameters, not {p.dtype}")


def _check_no_shared_memory(params: list) -> None:
    """Refuse parameters whose memory overlaps (two Parameters made on one
    tensor, a mis-tied weight): each would be stepped and renormalized on its
    own over the same numbers, and the result would depend on the backend.
    (The same tensor twice is a duplicate, refused elsewhere.)"""
    spans, seen = [], set()
    for p in params:
        if p.numel() == 0 or p.device.type == "meta" or id(p) in seen:
            continue  # the same tensor twice: torch.optim's own check says so
        seen.add(id(p))
        p = sharded.local(p)  # a DTensor: the memory this rank holds
        if p.numel() == 0:
            continue
        extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(p.shape, p.stride()))
        start = p.data_ptr() + min(0, sum((size - 1) * stride for size, stride in zip(p.shape, p.stride())
                                          if stride < 0)) * p.element_size()
        spans.append((p.device, start, start + extent * p.element_size(), tuple(p.shape)))
    spans.sort(key=lambda s: (str(s[0]), s[1]))
    for a, b in zip(spans, spans[1:]):
        if a[0] == b[0] and b[1] < a[2]:
            raise ValueError(f"parameters of shapes {a[3]} and {b[3]} share memory (two Parameters on one "
                             "tensor?): FusedFixNorm steps each parameter on its own, so they must not overlap")


def _check_buffer(buf, p: torch.Tensor) -> None:
    """A momentum buffer in the state must match its parameter (a state edited
    by hand, or loaded from a checkpoint of other parameters, may not)."""
    if not (isinstance(buf, torch.Tensor) and buf.shape == p.shape and buf.dtype == p.dtype
            and buf.device == p.device):
        what = (f"{buf.dtype}, {tuple(buf.shape)}, {buf.device}" if isinstance(buf, torch.Tensor)
                else type(buf).__name__)
        raise RuntimeError(f"the momentum_buffer in the state of a parameter ({p.dtype}, {tuple(p.shape)}, "
                           f"{p.device}) is ({what}): it must be a tensor of the parameter's dtype, shape and "
                           "device (was the state edited, or loaded from another model's checkpoint?)")


def _device_lr(lr) -> bool:
    """Whether ``lr`` is a tensor whose value the step must not read on the
    host: one on a GPU (a synchronization), or any while torch.compile traces
    the step (a read would be a data-dependent guard, a graph break)."""
    return isinstance(lr, torch.Tensor) and (lr.device.type != "cpu" or torch.compiler.is_compiling())


def _check_group(group: dict, *, read_device_lr: bool = True) -> None:
    """Raise ValueError for any invalid hyperparameter of one group. With
    ``read_device_lr=False`` an lr tensor on a GPU (or any, while traced) is
    checked for its shape only (see :func:`_device_lr`)."""
    if not read_device_lr and _device_lr(group["lr"]):
        if group["lr"].numel() != 1:
            raise ValueError(f"lr must be a number or a one-element tensor, got shape {tuple(group['lr'].shape)}")
        lr = 0.0
    else:
        lr = _scalar(group["lr"], "lr")
    for key in ("momentum", "dampening", "weight_decay"):
        if not math.isfinite(_scalar(group[key], key)):
            raise ValueError(f"Invalid {key} value: {group[key]} (must be finite)")
    for key in ("nesterov", "maximize"):
        if not isinstance(group[key], bool):
            raise TypeError(f"{key} must be True or False, got {group[key]!r}")
    if not (lr >= 0.0 and math.isfinite(lr)):
        raise ValueError(f"Invalid learning rate: {lr} (must be >= 0 and finite)")
    if not group["dampening"] >= 0.0:
        raise ValueError(f"Invalid dampening value: {group['dampening']} (must be >= 0)")
    if not group["momentum"] >= 0.0:
        raise ValueError(f"Invalid momentum value: {group['momentum']} (must be >= 0)")
    if not group["weight_decay"] >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {group['weight_decay']} (must be >= 0)")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    if group["norm"] not in NORM_MODES:
        raise ValueError(f"Invalid norm mode {group['norm']!r}: expected None, 'fixed' or 'max'")
    target = group["target_norm"]
    if target is not None and not (isinstance(target, (int, float)) and not isinstance(target, bool)
                                   and math.isfinite(target) and target > 0):
        raise ValueError(f"Invalid target_norm {target!r}: expected None (the norm at construction) or a finite number > 0")
    if not (group["norm_dim"] is None or (type(group["norm_dim"]) is int and group["norm_dim"] == 0)):
        raise ValueError(f"Invalid norm_dim {group['norm_dim']!r}: expected None (whole tensor) or 0 (each dim-0 slice)")


def _initial_target(p: torch.Tensor, norm_dim: Optional[int]) -> torch.Tensor:
    """The norm ``p`` has now (float64, one value per segment), kept as its target."""
    if sharded.is_dtensor(p):
        target = sharded.initial_target(p, norm_dim)
        values = sharded.local(target)
        if p.numel() == 0 or bool((torch.isfinite(values) & (values > 0)).all()):
            return target
        raise ValueError(f"a sharded parameter of shape {tuple(p.shape)} has a zero, inf or NaN norm (or dim-0 "
                         "slice norm), so there is no norm to keep: initialize it with finite values, or pass "
                         "an explicit target_norm for its group")
    target = reference.segment_norms(p, norm_dim)
    if p.numel() == 0 or bool((torch.isfinite(target) & (target > 0)).all()):  # one read, one sync
        return target.to(p.device)
    if not bool(torch.isfinite(target).all()):
        raise ValueError(f"a parameter of shape {tuple(p.shape)} has an inf or NaN norm (non-finite weights), so "
                         "there is no norm to keep: initialize it with finite values")
    raise ValueError(f"a parameter of shape {tuple(p.shape)} has a zero norm (or an all-zero dim-0 slice), so there "
                     "is no norm to keep: pass an explicit target_norm for its group")


def _unscale_grads_like_fused_sgd(grads: list, grad_scale: torch.Tensor, found_inf: Optional[torch.Tensor]) -> None:
    """What ``torch.optim.SGD(fused=True)`` leaves in ``.grad`` when a
    GradScaler hands it its scale: the unscaled gradients after a finite step,
    the gradients untouched (still scaled) after a skipped one. Done on the
    device, without reading ``found_inf``: the divisor is 1 when it is set."""
    divisor = grad_scale if found_inf is None else torch.where(found_inf != 0, torch.ones_like(grad_scale), grad_scale)
    by_device: dict = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    for device, group in by_device.items():
        torch._foreach_div_(group, divisor.to(device, non_blocking=True))


class FusedFixNorm(Optimizer):
    r"""SGD with momentum plus FixNorm's direct norm control (Zhou, Sun, Zhong 2021).

    For each parameter :math:`p` with gradient :math:`g` (``maximize`` negates
    :math:`g`, a GradScaler's scale divides it):

    .. math::
        g &\leftarrow g + \lambda p \\
        b &\leftarrow \mu b + (1-\tau) g \quad (b \leftarrow g \text{ on the first step}) \\
        d &\leftarrow g + \mu b \text{ (Nesterov)}, \quad d \leftarrow b \text{ otherwise} \\
        p &\leftarrow p - \eta\, d

    and then, for groups with norm control, per segment :math:`s` (the whole
    tensor, or each slice along dim 0 with ``norm_dim=0``) with
    :math:`n = \lVert p_s \rVert_2` and target :math:`r`:

    .. math::
        \text{"fixed"}: p_s \leftarrow p_s\, r / n, \qquad
        \text{"max"}: p_s \leftarrow p_s \min(1, r / n)

    (a segment with :math:`n = 0` is left as it is). With ``norm=None``
    everywhere this is exactly ``torch.optim.SGD``, and the state keeps SGD's
    ``momentum_buffer`` so checkpoints move between the two.

    Args:
        params: parameters or parameter groups (see :func:`fixnorm_param_groups`).
        lr, momentum, dampening, weight_decay, nesterov, maximize: as ``torch.optim.SGD``.
        norm: ``None``, ``"fixed"`` or ``"max"``.
        target_norm: ``None`` (the norm each parameter has when it joins the
            optimizer, recorded in its state) or a number > 0.
        norm_dim: ``None`` (the whole tensor is one segment) or ``0``.
        backend: ``"auto"``, ``"reference"``, ``"foreach"``, ``"cpu"``,
            ``"cuda"`` or ``"triton"``. A property of this object, never of a
            checkpoint. ``self.backend`` is the one in use and
            ``self.backend_reason`` says why. The ``"cuda"`` and ``"triton"``
            backends never synchronize with the host in
            ``step()`` (``lr`` may be a CUDA tensor, and GradScaler's tensors
            are read on the device), except on a step that would create
            momentum buffers while a GradScaler passes ``found_inf``: whether
            the buffers exist afterwards depends on its value.
        track_stats: also measure the angle each parameter turned in the step
            (``self.last_angles``, see :mod:`fixnorm_ext.diagnostics`). The
            ``"cpu"`` kernel sums what the angle needs in the same pass as the
            update; the other backends compare against a copy of the
            parameters made in Python (resnet50 on 2 CPU cores: a step 4x as
            long), for diagnosis runs.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        lr: Union[float, torch.Tensor] = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        norm: Optional[str] = None,
        target_norm: Optional[float] = None,
        norm_dim: Optional[int] = None,
        backend: str = "auto",
        track_stats: bool = False,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, norm=norm, target_norm=target_norm,
                        norm_dim=norm_dim)
        _check_group(defaults)
        if not isinstance(track_stats, bool):
            raise TypeError(f"track_stats must be True or False, got {track_stats!r}")
        self.track_stats = track_stats
        # With track_stats: the parameters of the last step and the angle each
        # turned, or what it is computed from (see last_angles).
        self._last_turn: tuple = ((), None)
        self.requested_backend = backend
        self.backend: Optional[str] = None
        self.backend_reason = ""
        # Tables a backend derives from the parameter layout, kept between steps.
        self._workspace: dict = {}
        super().__init__(params, defaults)

    def __getstate__(self):
        # torch's Optimizer pickles defaults, state and param_groups only; the
        # requested backend travels too, and the rest is derived again.
        return {**super().__getstate__(), "requested_backend": self.requested_backend,
                "track_stats": self.track_stats}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("requested_backend", "auto")
        self.__dict__.setdefault("track_stats", False)
        self._last_turn = ((), None)
        self._workspace = {}
        devices = {p.device.type for g in self.param_groups for p in g["params"]}
        self.backend, self.backend_reason = resolve_backend(self.requested_backend, devices)

    @property
    def last_angles(self) -> dict:
        """With ``track_stats=True``: per parameter stepped in the last step,
        the angle (radians, a float64 0-d tensor) it turned; 0 for a step
        skipped for an overflow. Empty otherwise."""
        params, turned = self._last_turn
        if turned is None:
            return {}
        if isinstance(turned, tuple):  # the kernel's sums and their layout: computed when first asked for
            turned = angles_from_sums(*turned)
            self._last_turn = (params, turned)
        return dict(zip(params, turned.unbind()))

    def add_param_group(self, param_group: dict) -> None:
        """Add a group, validate it, record the target norms of its parameters
        and (for ``"auto"``) choose the backend again."""
        # Take the params out once (they may come as a generator, or as
        # (name, tensor) pairs like SGD accepts from named_parameters()).
        params = param_group["params"]
        entries = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group = {**param_group, "params": entries}
        params = [e[1] if isinstance(e, tuple) else e for e in entries]
        for p in params:
            _check_param(p)
        if len({id(p) for p in params}) != len(params):
            # torch.optim only warns; stepped twice per step, such a tensor would
            # differ between backends (and from SGD), so it is refused.
            raise ValueError("a parameter group lists the same parameter more than once: FusedFixNorm refuses "
                             "duplicate parameters (pass each tensor once)")
        _check_no_shared_memory([p for g in self.param_groups for p in g["params"]] + params)
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        _check_group(merged)
        devices = {p.device.type for g in self.param_groups for p in g["params"]} | {p.device.type for p in params}
        backend, why = resolve_backend(self.requested_backend, devices)
        recorded = {}
        if merged["norm"] is not None and merged["target_norm"] is None:
            recorded = {p: _initial_target(p, merged["norm_dim"]) for p in params}
        super().add_param_group(param_group)
        for p, target in recorded.items():
            self.state[p]["target_norm"] = target
        if backend != self.backend:
            self.backend, self.backend_reason = backend, why
            log.info("FusedFixNorm: %s", why)

    @staticmethod
    def _recorded_target(p: torch.Tensor, st: Optional[dict], norm_dim: Optional[int], pending: dict) -> torch.Tensor:
        """The recorded target of ``p`` (``st`` is its state). A tensor without
        one (its group switched norm control on after construction) gets the
        norm it has now, put in ``pending`` to be stored only once the step has
        passed every check."""
        recorded = st.get("target_norm") if st else None
        if recorded is not None and not isinstance(recorded, torch.Tensor):
            raise RuntimeError(f"the target_norm in the state of a parameter of shape {tuple(p.shape)} is "
                               f"{type(recorded).__name__}, not a float64 tensor (was the state edited by hand?)")
        expected = () if norm_dim is None or p.dim() == 0 else (p.shape[0],)
        if recorded is None or tuple(recorded.shape) != expected:
            recorded = pending[p] = _initial_target(p, norm_dim)
        return recorded

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step (see the class docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if self.track_stats:
            self._last_turn = ((), None)  # a step that steps nothing leaves no angles

        # Gather and check everything before the first write: a refused step
        # changes no parameter and no state.
        params, grads, bufs, group_index, hypers, targets = [], [], [], [], [], []
        idle = []  # DTensor parameters without a gradient: (position, parameter, group), see sharded_step
        positions = []  # of the stepped parameters among all the optimizer's
        position = -1
        pending_targets: dict = {}
        # These backends take an lr tensor as it is: read on the device (no
        # synchronization), or while traced, in the graph.
        device_lr = self.backend != "reference"
        for group in self.param_groups:
            _check_group(group, read_device_lr=not device_lr)
            lr = group["lr"] if device_lr and _device_lr(group["lr"]) else _scalar(group["lr"], "lr")
            hyper = GroupHyper(
                lr=lr, momentum=float(group["momentum"]),
                dampening=float(group["dampening"]), weight_decay=float(group["weight_decay"]),
                nesterov=bool(group["nesterov"]), maximize=bool(group["maximize"]),
                norm=group["norm"], norm_dim=group["norm_dim"])
            gi = len(hypers)
            hypers.append(hyper)
            explicit = None if group["target_norm"] is None else float(group["target_norm"])
            for p in group["params"]:
                g = p.grad
                position += 1
                if g is None:
                    if sharded.is_dtensor(p):
                        idle.append((position, p, gi))
                    continue
                if g.is_sparse:
                    raise RuntimeError("FusedFixNorm does not support sparse gradients")
                if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                    raise RuntimeError(
                        f"gradient ({g.dtype}, {tuple(g.shape)}, {g.device}) does not match its parameter "
                        f"({p.dtype}, {tuple(p.shape)}, {p.device})")
                st = self.state.get(p)  # .get: a refused step must not create state entries
                buf = st.get("momentum_buffer") if st and hyper.momentum != 0 else None
                if buf is not None:
                    _check_buffer(buf, p)
                params.append(p)
                positions.append(position)
                grads.append(g)
                bufs.append(buf)
                group_index.append(gi)
                if hyper.norm is None:
                    targets.append(None)
                elif explicit is not None:
                    targets.append(explicit)
                else:
                    targets.append(self._recorded_target(p, st, hyper.norm_dim, pending_targets))
        if not params and not idle:
            return loss

        if idle or any(sharded.is_dtensor(p) for p in params):
            new_bufs, turned = sharded.sharded_step(
                params, grads, bufs, positions=positions, idle=idle, group_index=group_index, groups=hypers,
                targets=targets, backend=self.backend, grad_scale=grad_scale, found_inf=found_inf,
                workspace=self._workspace.setdefault("sharded", {}), track_stats=self.track_stats)
            if grad_scale is not None:
                _unscale_grads_like_fused_sgd([sharded.local(g) for g in grads], grad_scale, found_inf)
            if turned is not None:
                self._last_turn = (params, turned)
            self._finish_step(params, bufs, new_bufs, pending_targets, found_inf)
            return loss
        # track_stats: the kernel's sums where it reports them, else a copy.
        in_kernel = self.track_stats and self.backend in SUMS_BACKENDS
        sums = layout = None
        if in_kernel:
            layout = cached_sums_layout(params, bufs, group_index=group_index, groups=hypers, targets=targets,
                                        workspace=self._workspace)
            sums = torch.empty((layout.rows, SUM_COLS), dtype=torch.float64)
        before = [p.detach().clone() for p in params] if self.track_stats and not in_kernel else None
        new_bufs = fixnorm_step(params, grads, bufs, group_index=group_index, groups=hypers, targets=targets,
                                backend=self.backend, grad_scale=grad_scale, found_inf=found_inf,
                                workspace=self._workspace, sums=sums)
        if grad_scale is not None:
            _unscale_grads_like_fused_sgd(grads, grad_scale, found_inf)
        if sums is not None:
            self._last_turn = (params, (sums, layout))
        elif before is not None:
            turned = torch.stack(angles(before, [p.detach() for p in params])).double()
            self._last_turn = (params, turned)
        self._finish_step(params, bufs, new_bufs, pending_targets, found_inf)
        return loss

    def _finish_step(self, params, bufs, new_bufs, pending_targets, found_inf) -> None:
        """Store the targets recorded and the momentum buffers created by a step."""
        for p, target in pending_targets.items():
            self.state[p]["target_norm"] = target
        created = [i for i, (old, new) in enumerate(zip(bufs, new_bufs)) if old is None and new is not None]
        # A step skipped for an overflow creates no momentum buffer either.
        if created and not (found_inf is not None and bool(found_inf.item())):
            for i in created:
                self.state[params[i]]["momentum_buffer"] = new_bufs[i]

    def _check_checkpoint(self, state_dict: dict) -> None:
        """Refuse a checkpoint whose groups, momentum buffers or recorded
        targets would not fit this optimizer's parameters (ValueError, nothing
        loaded). Group counts and sizes are torch's own check."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(g["params"]) != len(c["params"]) for g, c in zip(saved_groups, self.param_groups)):
            return  # torch.optim's load_state_dict says what differs
        for k, group in enumerate(saved_groups):
            try:
                _check_group(group)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"checkpoint param group {k}: {exc}") from None
            for key, p in zip(group["params"], self.param_groups[k]["params"]):
                saved = state_dict["state"].get(key, {})
                buf = saved.get("momentum_buffer")
                if buf is not None and not (isinstance(buf, torch.Tensor) and buf.shape == p.shape):
                    what = tuple(buf.shape) if isinstance(buf, torch.Tensor) else type(buf).__name__
                    raise ValueError(f"checkpoint: the momentum_buffer of a parameter of shape {tuple(p.shape)} "
                                     f"is {what}")
                if "target_norm" in saved:
                    self._check_saved_target(saved["target_norm"], p, group)

    @staticmethod
    def _check_saved_target(target, p: torch.Tensor, group: dict) -> None:
        rows = group.get("norm_dim") == 0 and p.dim() > 0
        expected = (p.shape[0],) if rows else ()
        if sharded.is_dtensor(target):  # the shape is the whole tensor's; the values are this rank's rows
            shape, target = tuple(target.shape), sharded.local(target)
        else:
            shape = None
        try:
            t = torch.as_tensor(target, dtype=torch.float64, device="cpu")
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"checkpoint: the target_norm of a parameter of shape {tuple(p.shape)} is "
                             f"{type(target).__name__} {target!r}, not numbers") from None
        shape = tuple(t.shape) if shape is None else shape
        if shape != expected:  # step() would measure the norm again, silently
            raise ValueError(f"checkpoint: the target_norm of a parameter of shape {tuple(p.shape)} has shape "
                             f"{shape}, expected {expected}")
        if p.numel() == 0:
            return  # an empty tensor's norm is 0, and it is recorded as such
        if not bool((torch.isfinite(t) & (t > 0)).all()):
            raise ValueError(f"checkpoint: the target_norm of a parameter of shape {tuple(p.shape)} must be finite "
                             f"and > 0, got {t.tolist()}")

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint of FusedFixNorm or of ``torch.optim.SGD``.

        Groups saved without FixNorm's keys (an SGD checkpoint) keep this
        optimizer's norm settings and recorded targets; recorded target norms
        in the checkpoint come back exactly (float64), never measured again.
        """
        groups = []
        for saved, current in zip(state_dict["param_groups"], self.param_groups):
            groups.append({**{k: current[k] for k in _FIXNORM_KEYS if k not in saved}, **saved})
        state_dict = {**state_dict, "param_groups": groups + state_dict["param_groups"][len(groups):]}
        self._check_checkpoint(state_dict)  # before anything is replaced
        saved_targets = {k: v["target_norm"] for k, v in state_dict["state"].items() if "target_norm" in v}
        current_targets = {p: s["target_norm"] for p, s in self.state.items() if "target_norm" in s}
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for key, p in zip(ids, params):
            if key in saved_targets:
                self.state[p]["target_norm"] = torch.as_tensor(saved_targets[key]).to(torch.float64).to(p.device)
            elif p in current_targets:
                # A checkpoint without targets (torch.optim.SGD's): keep the
                # ones recorded when the parameter joined this optimizer.
                self.state[p]["target_norm"] = current_targets[p]
