"""Mixed precision (train.amp) and the CUDA path. bf16 and fp16 autocast, and fp16's GradScaler, run
on CPU too, so the code path is tested everywhere; the ``gpu`` tests (a CUDA device) check what only a
GPU can show: no host sync per batch, cudnn.benchmark, peak memory, resume on the device."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.core.loop import Precision, evaluate, train_one_epoch
from harness.errors import SpecError
from harness.spec import load_spec

CPU = torch.device("cpu")
TINY = ["train.epochs=2", "train.log_model=false", "train.sanity_check=false", "data.limit_train=400",
        "train.checkpoint=false"]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _batches(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(20, 4, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(32, 20, generator=g)
        out.append((x, (x @ w).argmax(1)))
    return out


@pytest.mark.parametrize("mode, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_runs_the_forward_in_low_precision_and_learns(mode, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    p = Precision(mode, CPU)
    assert (p.scaler is not None) == (mode == "fp16")
    data = _batches()
    before = evaluate(model, data, CPU, precision=p)["val/loss"]
    for epoch in range(1, 6):
        m = train_one_epoch(model, data, opt, CPU, epoch=epoch, precision=p)
    after = evaluate(model, data, CPU, precision=p)["val/loss"]
    assert set(seen) == {dtype}
    assert after < before * 0.7 and m["train/acc"] > 0.5
    assert all(q.dtype == torch.float32 for q in model.parameters())  # master weights stay float32


def test_fp16_skips_a_step_whose_gradients_overflowed_and_backs_off():
    model = nn.Linear(20, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p = Precision("fp16", CPU)
    x, y = _batches(1)[0]
    h = model.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    before = model.weight.detach().clone()
    with p.autocast():
        loss = nn.functional.cross_entropy(model(x), y)
    p.backward_and_step(loss, opt)
    assert torch.equal(model.weight, before)  # the step was skipped, not applied with inf
    assert p.scaler.get_scale() == 2.0 ** 15  # and the scale backed off from 2**16
    h.remove()
    opt.zero_grad()
    with p.autocast():
        loss = nn.functional.cross_entropy(model(x), y)
    p.backward_and_step(loss, opt)
    assert not torch.equal(model.weight, before)


def test_off_is_plain_float32():
    p = Precision("off", CPU)
    assert p.scaler is None
    with p.autocast():
        assert nn.Linear(3, 2)(torch.ones(1, 3)).dtype == torch.float32
    with pytest.raises(ValueError):
        Precision("fp8", CPU)


def test_spec_amp_values(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("train:\n  amp: off\n")  # YAML 1.1 reads a bare off as false
    assert load_spec(p).train.amp == "off"
    assert load_spec(None, ["train.amp=bf16"]).train.amp == "bf16"
    with pytest.raises(SpecError, match="train.amp"):
        load_spec(None, ["train.amp=fp8"])


def test_a_bf16_run_trains_on_cpu():
    from harness.run import build, run
    from harness.tracking.tracker import MemoryTracker

    spec = load_spec(None, [*TINY, "train.amp=bf16", "train.device=cpu", "model.batchnorm=true"])
    assert build(spec).policy.precision.mode == "bf16"
    t = MemoryTracker()
    r = run(spec, tracker=t, progress=False)
    assert t.status == "FINISHED" and r.metrics["val/acc"] > 0.5


# -- the CUDA path: run where a GPU is lent (pytest -m gpu) --------------------------------------------

@pytest.mark.gpu
@gpu
def test_device_resident_batches_need_no_host_sync():
    from harness.core.data import load_data
    from harness.spec import DataSpec

    dev = torch.device("cuda")
    data = load_data(DataSpec(augment=True, batch_size=64), seed=0, device=dev)
    assert data.train.split.x.device.type == "cuda"
    it = iter(data.train)
    next(it)  # the epoch's order and augmentation cross to the device once, here
    torch.cuda.set_sync_debug_mode("error")
    try:
        n = sum(1 for _ in it)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert n == len(data.train) - 1


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_a_cuda_run_with_amp_logs_peak_memory(amp):
    from harness.run import run
    from harness.tracking.tracker import MemoryTracker

    spec = load_spec(None, [*TINY, f"train.amp={amp}", "train.device=cuda", "model.batchnorm=true"])
    t = MemoryTracker()
    r = run(spec, tracker=t, progress=False)
    assert t.status == "FINISHED" and r.metrics["val/acc"] > 0.5
    assert t.metrics["train/peak_mem_mb"] and t.metrics["val/peak_mem_mb"]
    assert torch.backends.cudnn.benchmark is True


@pytest.mark.gpu
@gpu
def test_resume_on_cuda_matches_the_uninterrupted_run():
    from harness.core.loop import Stopped
    from harness.run import run
    from harness.tracking.tracker import MemoryTracker

    spec = load_spec(None, ["train.epochs=3", "train.log_model=false", "train.sanity_check=false",
                            "data.limit_train=400", "train.device=cuda", "train.amp=bf16",
                            "train.deterministic=true"])
    whole = run(spec, tracker=MemoryTracker(), progress=False)
    t = MemoryTracker()

    def stop(epoch, metrics):
        if epoch == 2:
            raise Stopped("killed")

    with pytest.raises(Stopped):
        run(spec, tracker=t, on_epoch=stop, progress=False)
    resumed = run(spec, tracker=t, resume_run_id=t.run_id, progress=False)
    assert resumed.metrics["test/acc"] == pytest.approx(whole.metrics["test/acc"], abs=1e-6)
