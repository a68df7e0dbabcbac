import pytest
import torch

from rae_core.models import build_model
from rae_core.store import atomic_save, safe_load
from rae_core.train.common import EMA, warmup_constant_linear, warmup_cosine
from rae_core.train.generator import accumulate_gradients
from rae_core.transport import Transport


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_accumulated_gradients_equal_the_large_batch():
    torch.manual_seed(0)
    model = build_model("DiT-micro", in_channels=64, grid_size=4, num_classes=10,
                        label_dropout=0.0)
    # Give the zero-initialised output layers weights so every parameter gets a gradient.
    for p in model.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    transport = Transport(shift=0.5)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 64, 4, 4, generator=g), torch.randint(0, 10, (16,), generator=g)
    noise, t = torch.randn(x.shape, generator=g), transport.sample_time(16, generator=g)
    results = {}
    for accum in (1, 4):
        model.zero_grad(set_to_none=True)
        loss = accumulate_gradients(model, transport, (x, y, noise, t), accum)
        results[accum] = (loss, _grads(model).clone())
    assert torch.allclose(results[1][0], results[4][0], rtol=1e-5)
    assert torch.allclose(results[1][1], results[4][1], rtol=1e-4, atol=1e-7)
    assert results[1][1].abs().sum() > 0


def test_schedules_hit_their_known_values():
    assert warmup_cosine(0, 1.0, 0.1, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 1.0, 0.1, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 1.0, 0.1, 10, 110) == pytest.approx(0.55)
    assert warmup_cosine(110, 1.0, 0.1, 10, 110) == pytest.approx(0.1)
    f = [warmup_constant_linear(s, 2e-4, 2e-5, 0, 40, 800) for s in (0, 39, 40, 420, 800)]
    assert f[:3] == [2e-4] * 3
    assert f[3] == pytest.approx(2e-4 + (2e-5 - 2e-4) * 0.5)
    assert f[4] == pytest.approx(2e-5)


def test_ema_tracks_the_model_at_its_rate():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, 0.9)
    model.weight.data.fill_(1.0)
    for _ in range(10):
        ema.update(model)
    assert ema.model.weight[0, 0].item() == pytest.approx(1 - 0.9 ** 10)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_atomic_save_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"step": 1}, path)

    def broken_save(obj, f):
        open(f, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert safe_load(path) == {"step": 1}

