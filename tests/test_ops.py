"""The compiled op: registered once, with a CPU kernel and a fake kernel that
pass torch.library.opcheck, and refusing malformed calls before any write."""
import pytest
import torch

from fixnorm_ext import available_backends
from fixnorm_ext.dispatch import GroupHyper, build_hparams, build_tables

pytestmark = pytest.mark.skipif(available_backends("cpu")["cpu"] is not None,
                                reason=str(available_backends("cpu")["cpu"]))


def op_args(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=gen, dtype=dtype), torch.randn(7, generator=gen, dtype=dtype),
              torch.randn(4, 4, generator=gen, dtype=dtype)]
    grads = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in params]
    bufs = [torch.zeros_like(params[0]), None, torch.randn(4, 4, generator=gen, dtype=dtype)]
    groups = [GroupHyper(0.1, 0.9, 0.0, 0.0, True, False, "fixed", 0),
              GroupHyper(0.1, 0.0, 0.0, 0.01, False, True, "max", None)]
    group_index = [0, 1, 0]
    targets = [torch.ones(5, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64),
               torch.full((4,), 2.0, dtype=torch.float64)]
    meta, flat = build_tables(params, bufs, group_index=group_index, groups=groups, targets=targets)
    hparams = build_hparams(groups)
    return params, grads, [bufs[0], bufs[2]], hparams, meta, flat


def test_cpu_kernel_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fixnorm_ext::fixnorm_step", "CPU")
    schema = str(torch.ops.fixnorm_ext.fixnorm_step.default._schema)
    assert "Tensor(a!)[] params" in schema and "Tensor(b!)[] momentum_buffers" in schema


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    params, grads, bufs, hparams, meta, flat = op_args(dtype)
    torch.library.opcheck(torch.ops.fixnorm_ext.fixnorm_step.default,
                          (params, grads, bufs, hparams, meta, flat, [], None, None))
    scale, found = torch.tensor(4.0), torch.tensor(0.0)
    torch.library.opcheck(torch.ops.fixnorm_ext.fixnorm_step.default,
                          (params, grads, bufs, hparams, meta, flat, [], scale, found))


def test_found_inf_is_a_no_op():
    params, grads, bufs, hparams, meta, flat = op_args()
    before = [t.clone() for t in params + bufs]
    torch.ops.fixnorm_ext.fixnorm_step(params, grads, bufs, hparams, meta, flat, [], None, torch.tensor(1.0))
    after = params + bufs
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("breakage, message", [
    (lambda a: a[1].__setitem__(2, torch.randn(4, 5)), "does not match its param"),
    (lambda a: a[1].__setitem__(2, a[1][2].double()), "does not match its param"),
    (lambda a: a[4][2].__setitem__(5, -1), "needs a momentum buffer"),
    (lambda a: a[4][1].__setitem__(5, 1), "has a momentum buffer but its group has no momentum"),
    (lambda a: a[4][2].__setitem__(5, 0), "already taken"),
    (lambda a: a[2].pop(), "out of range"),
    (lambda a: a[2].__setitem__(1, torch.zeros(4, 5)), "dtype, shape and strides of param"),
    (lambda a: a[4][2].__setitem__(1, 7), "unknown mode"),
    (lambda a: a[4][2].__setitem__(0, 5), "names group"),
    (lambda a: a[4][2].__setitem__(4, 100), "outside targets"),
    (lambda a: a[0].__setitem__(2, torch.randn(4, 4).t()), "other strides than the param"),
    (lambda a: a[0].__setitem__(2, torch.randn(4, 8)[:, ::2]), "is not dense"),
    (lambda a: a[0].__setitem__(2, torch.randn(4, 4, dtype=torch.complex64)), "unsupported dtype"),
    (lambda a: a.append([torch.zeros(1, dtype=torch.long)]), "takes no plan"),
])
def test_bad_calls_change_nothing(breakage, message):
    args = list(op_args())
    args = [list(a) if isinstance(a, list) else a for a in args]
    breakage(args)
    params, bufs = args[0], args[2]
    before = [t.clone() for t in params + bufs]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fixnorm_ext.fixnorm_step(*args, *([] if len(args) == 7 else [[]]), None, None)
    after = params + bufs
    assert all(torch.equal(a, b) for a, b in zip(before, after))
