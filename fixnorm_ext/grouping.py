"""Sort a model's parameters into FixNorm parameter groups.

FixNorm (Zhou, Sun, Zhong 2021) treats three kinds of parameter differently:

* **scale-invariant weights** (role ``"fixed"``): the ``weight`` ``w`` of a
  bias-free ``Conv1d``/``Conv2d``/``Conv3d`` (any ``groups``) or ``Linear`` whose
  output goes only into normalization layers. The normalization divides out any
  scale, so ``L(a·w) = L(w)`` for every ``a > 0`` and the effective step is
  ``lr / ||w||²``; the optimizer holds ``||w||`` at its initial value so that the
  learning rate alone sets that step.
* **the classifier** (role ``"classifier"``): the weight of the final ``Linear``.
  Nothing normalizes its output, so ``||w||`` sets the logit scale; the optimizer
  bounds it (``"max"``) or fixes it (``"fixed"``) at ``fc_norm``.
* **everything else** (role ``"other"``): biases, normalization affine parameters,
  embeddings, weights followed by anything but a normalization. Plain SGD.
"""
import contextlib
import difflib
import math
import numbers
import warnings
from collections import defaultdict
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FixNormParamGroups", "fixnorm_param_groups"]

_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORM_LAYERS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.GroupNorm, nn.LayerNorm, nn.RMSNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)
_NORM_FUNCTIONS = frozenset({
    F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.rms_norm,
    torch.batch_norm, torch.layer_norm, torch.group_norm, torch.instance_norm,
    torch.rms_norm,
})
_ROLES = ("fixed", "classifier", "other")
_OVERRIDE_ROLES = {"fixed": "fixed", "max": "classifier", "none": "other", None: "other"}
_FC_MODES = {"clamp": "max", "fix": "fixed"}
_METHOD_TEXT = {
    "fx": "structure read from the torch.fx graph",
    "registration-order": "structure guessed from module registration order (torch.fx could not trace)",
}


class FixNormParamGroups(list):
    """The parameter groups made by :func:`fixnorm_param_groups`.

    A ``list`` of param-group dicts, so it can be passed straight to
    ``FusedFixNorm`` or any ``torch.optim`` optimizer. Each dict carries
    ``params``, ``norm``, ``target_norm``, ``norm_dim`` and ``role``.

    Attributes:
        roles: parameter name (as in ``model.named_parameters()``) to its role,
            ``"fixed"``, ``"classifier"`` or ``"other"``, in model order.
        method: how the structure was read, ``"fx"`` or ``"registration-order"``.
        frozen: names of the parameters left out because ``requires_grad=False``.
    """

    def __init__(self, groups, roles, method, shapes, frozen):
        super().__init__(groups)
        self.roles = roles
        self.method = method
        self.frozen = frozen
        self._shapes = shapes

    def summary(self) -> str:
        """A table of every grouped parameter (role, name, shape, element count),
        then totals and the norm treatment per role."""
        name_width = max([len("parameter"), *map(len, self.roles)])
        shape_text = {name: str(tuple(shape)) for name, shape in self._shapes.items()}
        shape_width = max([len("shape"), *map(len, shape_text.values())])
        lines = [
            f"FixNorm parameter groups ({_METHOD_TEXT[self.method]})",
            f"{'role':<10}  {'parameter':<{name_width}}  {'shape':<{shape_width}}  {'count':>12}",
        ]
        for name, role in self.roles.items():
            count = math.prod(self._shapes[name])
            lines.append(f"{role:<10}  {name:<{name_width}}  {shape_text[name]:<{shape_width}}  {count:>12,}")

        lines += ["", f"{'role':<10}  {'tensors':>7}  {'elements':>12}  treatment"]
        for group in self:
            role = group["role"]
            names = [name for name, r in self.roles.items() if r == role]
            elements = sum(math.prod(self._shapes[name]) for name in names)
            lines.append(f"{role:<10}  {len(names):>7}  {elements:>12,}  {_treatment(group)}")
        if self.frozen:
            lines.append(f"left out (requires_grad=False): {', '.join(self.frozen)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        counts = ", ".join(f"{group['role']}={len(group['params'])}" for group in self)
        return f"FixNormParamGroups(method={self.method!r}, {counts})"


def fixnorm_param_groups(model, *, fc_norm=None, fc_mode="clamp", norm_dim=None,
                         overrides=None, classifier=None, verbose=False) -> FixNormParamGroups:
    """Split ``model``'s trainable parameters into FixNorm parameter groups.

    Rules, in order of precedence, for each parameter with ``requires_grad=True``
    (frozen ones are left out; a tied parameter appears once, under its first
    name in ``model.named_parameters()``):

    1. ``overrides[module_name]`` decides the role of that module's ``weight``:
       ``"fixed"`` → scale-invariant group, ``"max"`` → classifier group,
       ``"none"`` or ``None`` → other group.
    2. The classifier weight → group
       ``{"norm": "max", "target_norm": fc_norm, "norm_dim": None}``
       (``"norm": "fixed"`` when ``fc_mode="fix"``), i.e. after each step
       ``w ← w·min(1, fc_norm/||w||)`` (or ``w ← w·fc_norm/||w||``).
       It is the module named by ``classifier`` if given, otherwise the last
       ``nn.Linear`` in execution order whose output reaches the model output
       (through any ops). If that Linear's weight is scale-invariant (rule 3),
       its norm does not set the logit scale: it stays "fixed" and the model
       has no classifier. The classifier's bias is "other".
    3. A scale-invariant weight → group
       ``{"norm": "fixed", "target_norm": None, "norm_dim": norm_dim}``, i.e.
       ``w ← w·r/||w||`` with ``r`` its norm at optimizer construction. A weight
       is scale-invariant when it is the ``weight`` of a Conv1d/2d/3d or Linear
       with no bias, and every output of that layer is used only as the input of
       a normalization: ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``GroupNorm``,
       ``LayerNorm``, ``RMSNorm``, ``InstanceNorm1d/2d/3d`` or their functional
       forms. A tied weight must satisfy this for every layer that holds it, and
       must not be read anywhere else in ``forward``.
    4. Everything else → group ``{"norm": None}``: plain SGD.

    The structure comes from tracing ``model`` with ``torch.fx`` (Conv, Linear and
    normalization modules, subclasses included, are kept as single graph nodes).
    If tracing fails, e.g. because ``forward`` branches on tensor values, a
    ``UserWarning`` says why and the structure is guessed from registration
    order instead: among modules without children, in ``named_modules()``
    order, a bias-free Conv/Linear immediately followed by a normalization
    module is scale-invariant, and every registered ``nn.Linear`` counts as
    reaching the output. ``.method`` on the result records which was used.

    Args:
        model: the ``nn.Module`` to classify.
        fc_norm: target norm of the classifier weight, a finite number > 0, or
            ``None`` to keep the classifier at (``"fix"``) or below (``"clamp"``)
            the norm it has when the optimizer is constructed.
        fc_mode: ``"clamp"`` bounds the classifier norm (``norm="max"``);
            ``"fix"`` holds it exactly (``norm="fixed"``).
        norm_dim: ``norm_dim`` of the scale-invariant group: ``None`` fixes the
            norm of the whole tensor, ``0`` the norm of each output filter/row.
            Per-filter control assumes each output channel is normalized on its
            own (BatchNorm, InstanceNorm); after LayerNorm or GroupNorm only the
            whole-tensor norm is scale-invariant.
        overrides: mapping of module name (as in ``model.named_modules()``) to
            ``"fixed"``, ``"max"``, ``"none"`` or ``None``, applied to that
            module's ``weight`` over every automatic decision.
        classifier: name of the classifier module, replacing auto-detection.
        verbose: print :meth:`FixNormParamGroups.summary`.

    Returns:
        A :class:`FixNormParamGroups`: the non-empty groups in the order fixed,
        classifier, other, each dict also holding its ``"role"``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: bad ``fc_norm``, ``fc_mode``, ``norm_dim`` or ``overrides``;
            an unknown module name, or a module without a trainable ``weight``,
            in ``overrides`` or ``classifier``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    fc_norm = _check_fc_norm(fc_norm)
    if not isinstance(fc_mode, str) or fc_mode not in _FC_MODES:
        raise ValueError(f"fc_mode must be one of {sorted(_FC_MODES)}, got {fc_mode!r}")
    if not (norm_dim is None or (type(norm_dim) is int and norm_dim == 0)):
        raise ValueError(f"norm_dim must be None (whole tensor) or 0 (each output slice), got {norm_dim!r}")

    if overrides is not None and not isinstance(overrides, Mapping):
        raise ValueError(f"overrides must be a dict of module name -> 'fixed'/'max'/'none'/None, "
                         f"got {type(overrides).__name__}")
    override_roles = {}
    for name, value in (overrides or {}).items():
        if not (value is None or isinstance(value, str)) or value not in _OVERRIDE_ROLES:
            raise ValueError(
                f"overrides[{name!r}] must be one of 'fixed', 'max', 'none' or None, got {value!r}")
        override_roles[id(_trainable_weight(model, name, "overrides"))] = _OVERRIDE_ROLES[value]

    try:
        structure = _structure_from_fx(model)
        method = "fx"
    except Exception as exc:  # any trace failure: the fallback below is the documented answer
        warnings.warn(
            f"fixnorm_param_groups: torch.fx could not trace {type(model).__name__} "
            f"({type(exc).__name__}: {exc}); falling back to module registration order, "
            f"which assumes layers are registered in the order forward calls them. "
            f"Check .summary() and use `overrides`/`classifier` where it is wrong.",
            UserWarning, stacklevel=2)
        structure = _structure_from_registration(model)
        method = "registration-order"

    scale_invariant = _scale_invariant_params(model, structure)
    if classifier is not None:
        classifier_weight = _trainable_weight(model, classifier, "classifier")
    else:
        classifier_weight = _classifier_weight(model, structure.linears_to_output, scale_invariant)

    members = {role: [] for role in _ROLES}
    roles, shapes, frozen = {}, {}, []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            frozen.append(name)
            continue
        if id(param) in override_roles:
            role = override_roles[id(param)]
        elif param is classifier_weight:
            role = "classifier"
        elif id(param) in scale_invariant:
            role = "fixed"
        else:
            role = "other"
        members[role].append(param)
        roles[name] = role
        shapes[name] = tuple(param.shape)

    settings = {
        "fixed": {"norm": "fixed", "target_norm": None, "norm_dim": norm_dim},
        "classifier": {"norm": _FC_MODES[fc_mode], "target_norm": fc_norm, "norm_dim": None},
        "other": {"norm": None, "target_norm": None, "norm_dim": None},
    }
    groups = [{"params": members[role], **settings[role], "role": role}
              for role in _ROLES if members[role]]
    result = FixNormParamGroups(groups, roles, method, shapes, frozen)
    if verbose:
        print(result.summary())
    return result


class _Structure(NamedTuple):
    """What grouping needs to know about a model's data flow."""

    invariant_layers: set  # names of Conv/Linear modules whose every call feeds only normalizations
    linears_to_output: list  # names of nn.Linear modules reaching the output, in execution order
    read_directly: set  # ids of parameters that forward reads outside their own module's call


class _LayerTracer(torch.fx.Tracer):
    """A tracer that keeps Conv, Linear and normalization modules, including user
    subclasses (which fx would otherwise trace through), as single graph nodes."""

    def is_leaf_module(self, m, module_qualified_name):
        return isinstance(m, _WEIGHT_LAYERS + _NORM_LAYERS) or super().is_leaf_module(m, module_qualified_name)


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


@contextlib.contextmanager
def _forward_hooks_off(model):
    """Every module's forward hooks taken out while the block runs, then put
    back. Tracing calls each module, and hooks would run on fx proxies:
    fully_shard's would set up the first sharded block as its root, and the
    model's first real forward would then fail."""
    saved = []
    for m in model.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(m, attr, None)
            if hooks:
                saved.append((hooks, dict(hooks)))
                hooks.clear()
    try:
        yield
    finally:
        for hooks, items in saved:
            hooks.update(items)


def _structure_from_fx(model) -> _Structure:
    with _forward_hooks_off(model):
        graph = _LayerTracer().trace(model)
    calls = defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target].append(node)

    invariant = {
        name for name, nodes in calls.items()
        if _is_bias_free_layer(model.get_submodule(name))
        and all(node.users and all(_normalizes(model, user, node) for user in node.users) for node in nodes)
    }

    output = next(node for node in graph.nodes if node.op == "output")
    reaching = _ancestors(output)
    linears = [node.target for node in graph.nodes
               if node.op == "call_module" and node in reaching
               and isinstance(model.get_submodule(node.target), nn.Linear)]

    read_directly = set()
    for node in graph.nodes:
        if node.op == "get_attr":
            try:
                read_directly.add(id(model.get_parameter(node.target)))
            except AttributeError:  # a buffer, constant or submodule, not a parameter
                pass
    return _Structure(invariant, linears, read_directly)


def _structure_from_registration(model) -> _Structure:
    leaves = [(name, module) for name, module in model.named_modules()
              if next(module.children(), None) is None]
    invariant = {
        name for (name, module), (_, following) in zip(leaves, leaves[1:])
        if _is_bias_free_layer(module) and isinstance(following, _NORM_LAYERS)
    }
    linears = [name for name, module in leaves if isinstance(module, nn.Linear)]
    return _Structure(invariant, linears, set())


def _is_bias_free_layer(module) -> bool:
    return (isinstance(module, _WEIGHT_LAYERS) and module.bias is None
            and isinstance(module.weight, nn.Parameter))


def _normalizes(model, user, producer) -> bool:
    """Whether graph node ``user`` is a normalization whose input is ``producer``
    and which uses ``producer`` nowhere else (e.g. not as its weight)."""
    if user.op == "call_module":
        is_norm = isinstance(model.get_submodule(user.target), _NORM_LAYERS)
    else:
        is_norm = user.op == "call_function" and user.target in _NORM_FUNCTIONS
    if not is_norm:
        return False
    first_input = user.args[0] if user.args else user.kwargs.get("input")
    uses = []
    torch.fx.node.map_arg((user.args, user.kwargs), uses.append)
    return first_input is producer and uses.count(producer) == 1


def _ancestors(node) -> set:
    """``node`` and every node it depends on."""
    seen, stack = {node}, [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _scale_invariant_params(model, structure) -> set:
    """ids of the parameters that are scale-invariant in every place they are used."""
    holders = defaultdict(list)  # id(param) -> [(module name, attribute name)]
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            holders[id(param)].append((module_name, attr))
    return {
        key for key, places in holders.items()
        if key not in structure.read_directly
        and all(attr == "weight" and name in structure.invariant_layers for name, attr in places)
    }


def _classifier_weight(model, linear_names, scale_invariant):
    """The weight of the last Linear in ``linear_names``, or None when there is
    none or its output is normalized (then it is not setting a logit scale)."""
    if not linear_names:
        return None
    weight = model.get_submodule(linear_names[-1]).weight
    if not isinstance(weight, nn.Parameter) or id(weight) in scale_invariant:
        return None
    return weight


def _trainable_weight(model, name, argument):
    """The trainable ``weight`` parameter of submodule ``name``, or a ValueError
    that names ``argument`` and suggests valid module names."""
    if not isinstance(name, str):
        raise ValueError(f"{argument}: module names must be strings, got {name!r}")
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{argument}: {type(model).__name__} has no module named {name!r}; "
                         f"{_valid_names_hint(model, name)}") from None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise ValueError(f"{argument}: module {name!r} ({type(module).__name__}) has no 'weight' "
                         f"parameter; {_valid_names_hint(model, name)}")
    if not weight.requires_grad:
        raise ValueError(f"{argument}: {name}.weight has requires_grad=False, so it is left out of "
                         f"every group; unfreeze it or drop {name!r} from {argument}")
    return weight


def _valid_names_hint(model, name) -> str:
    names = [n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), nn.Parameter)]
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
    shown = ", ".join(map(repr, names[:5]))
    more = f", ... ({len(names)} in all)" if len(names) > 5 else ""
    return f"{hint}modules with a weight: {shown}{more}"


def _check_fc_norm(fc_norm):
    if fc_norm is None:
        return None
    if (isinstance(fc_norm, bool) or not isinstance(fc_norm, numbers.Real)
            or not math.isfinite(fc_norm) or fc_norm <= 0):
        raise ValueError(f"fc_norm must be None (keep the classifier's initial norm) "
                         f"or a finite number > 0, got {fc_norm!r}")
    return float(fc_norm)


def _treatment(group) -> str:
    if group["norm"] is None:
        return "no norm control (plain SGD)"
    target = ("its value when the optimizer is built" if group["target_norm"] is None
              else f"{group['target_norm']:g}")
    verb = "held at" if group["norm"] == "fixed" else "clamped to at most"
    scope = "" if group["norm_dim"] is None else f", per slice along dim {group['norm_dim']}"
    return f"norm {verb} {target}{scope}"
