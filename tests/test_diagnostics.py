"""fixnorm_ext.diagnostics and FusedFixNorm(track_stats=True)."""
import math
import pickle

import pytest
import torch

from fixnorm_ext import FusedFixNorm, diagnostics, fixnorm_param_groups
from test_optimizer import BACKENDS


@pytest.mark.parametrize("turn", [0.7, 1e-3, 1e-5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_angle_of_a_known_rotation(backend, turn):
    """w = (1, 0) at fixed norm 1, stepped to (1, tan a) and renormalized:
    it turned by exactly a, small angles included (1e-5 rad: an acos of the
    dot product would give 0 or 3e-4 there, in float32)."""
    w = torch.tensor([1.0, 0.0], requires_grad=True)
    plain = torch.tensor([3.0, 4.0], requires_grad=True)
    opt = FusedFixNorm([{"params": [w], "norm": "fixed"}, {"params": [plain]}], lr=1.0, backend=backend,
                       track_stats=True)
    w.grad = torch.tensor([0.0, -math.tan(turn)])
    plain.grad = torch.tensor([0.0, 0.0])
    opt.step()
    assert opt.last_angles[w].item() == pytest.approx(turn, rel=1e-5, abs=1e-7)
    assert opt.last_angles[plain].item() == 0.0
    rows = diagnostics.layer_stats(opt)
    assert rows[0].angle == pytest.approx(turn, rel=1e-5, abs=1e-7) and rows[1].angle == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_track_stats_does_not_change_the_step(backend):
    def run(track):
        torch.manual_seed(0)
        ps = [torch.randn(6, 5, requires_grad=True), torch.randn(4, requires_grad=True)]
        opt = FusedFixNorm([{"params": ps[:1], "norm": "fixed"}, {"params": ps[1:]}], lr=0.1, momentum=0.9,
                           backend=backend, track_stats=track)
        for step in range(3):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
        return ps, opt

    (ps, opt), (qs, tracked) = run(False), run(True)
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    assert opt.last_angles == {} and set(tracked.last_angles) == set(qs)
    assert tracked.state_dict().keys() == opt.state_dict().keys()
    assert all("angle" not in s for s in tracked.state_dict()["state"].values())  # not saved in checkpoints


def test_layer_stats_of_a_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))
    opt = FusedFixNorm(fixnorm_param_groups(model, fc_norm=2.0), lr=0.2, momentum=0.9)
    rows = {r.name: r for r in diagnostics.layer_stats(opt, model)}
    conv, fc = rows["0.weight"], rows["4.weight"]
    norm = model[0].weight.detach().double().norm().item()
    assert conv.mode == "fixed" and conv.norm == pytest.approx(norm) and conv.target == pytest.approx(norm)
    assert conv.effective_lr == pytest.approx(0.2 / norm ** 2)
    assert fc.mode == "max" and fc.target == 2.0 and fc.effective_lr is None
    assert rows["1.weight"].mode is None and rows["1.weight"].target is None
    assert all(r.angle is None for r in rows.values())  # no track_stats
    assert diagnostics.classifier_norm(opt) == pytest.approx(model[4].weight.detach().double().norm().item())
    table = diagnostics.format_table(list(rows.values()))
    assert "0.weight" in table and "lr/||w||^2" in table and len(table.splitlines()) == len(rows) + 1


def test_layer_stats_per_row_and_tensor_lr():
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0]], requires_grad=True)
    opt = FusedFixNorm([{"params": [w], "norm": "fixed", "norm_dim": 0}], lr=torch.tensor(0.5))
    (row,) = diagnostics.layer_stats(opt)
    assert row.norm == pytest.approx(3.5) and row.target == pytest.approx(3.5)  # mean of 5 and 2
    assert row.lr == 0.5 and row.effective_lr == pytest.approx(0.5 / 3.5 ** 2)


def test_margins():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0], [1.0, 1.0, 0.0], [0.0, -2.0, 4.0]])
    labels = torch.tensor([0, 1, 0, 2])
    m = diagnostics.margins(logits, labels)
    # margins: 1.5, -2.0, 0.0, 4.0
    assert m["mean"] == pytest.approx(0.875) and m["min"] == -2.0 and m["fraction_wrong"] == 0.5
    assert m["median"] == 0.0  # torch.median: the lower of the two middle values
    with pytest.raises(ValueError, match="logits"):
        diagnostics.margins(logits[:, :1], labels)
    with pytest.raises(ValueError, match="labels"):
        diagnostics.margins(logits, labels[:2])


def test_track_stats_is_kept_by_pickle_and_checked():
    p = torch.randn(3, requires_grad=True)
    opt = pickle.loads(pickle.dumps(FusedFixNorm([p], lr=0.1, track_stats=True)))
    assert opt.track_stats is True and opt.last_angles == {}
    with pytest.raises(TypeError, match="track_stats"):
        FusedFixNorm([p], lr=0.1, track_stats="yes")
