"""Quantization-aware training tasks: fixed-precision QAT and RefQSR (loss (9) on Algorithm-1 pairs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from refqsr_engine.errors import RefQSRError
from refqsr_engine.models.checkpoint import load_model, save_model
from refqsr_engine.models.clustblock import ClustBlock
from refqsr_engine.models.refqsr import RefQSR
from refqsr_engine.models.registry import build_sr
from refqsr_engine.models.srresnet import interpolation_init
from refqsr_engine.training.loop import TrainConfig, train
from refqsr_engine.training.runlog import read_log


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    from skimage import data

    root = tmp_path_factory.mktemp("qat")
    (root / "train").mkdir()
    (root / "val").mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(data, name)()[:200, :240]).save(root / "train" / f"{name}.png")
    Image.fromarray(data.rocket()[100:228, 100:228]).save(root / "val" / "rocket.png")
    torch.manual_seed(0)
    teacher = interpolation_init(build_sr("srresnet"))
    save_model(root / "teacher.pt", teacher)
    clust = ClustBlock(8)
    clust.calibrate(torch.rand(8, 3, 24, 24))
    save_model(root / "clust.pt", clust)
    return {"root": root, "teacher": root / "teacher.pt", "clust": root / "clust.pt"}


def _cfg(setup, out: Path, task: str, bits: str, steps: int, **kw) -> TrainConfig:
    return TrainConfig(
        data=str(setup["root"]),
        out=str(out),
        steps=steps,
        task=task,
        bits=bits,
        batch=2,
        lr_patch=24,
        teacher=str(setup["teacher"]),
        val_every=steps,
        val_crop=64,
        ckpt_every=1,
        quiet=True,
        clustblock=str(setup["clust"]) if task == "refqsr" else None,
        tau=-1.0,
        **kw,
    )


def test_qat_trains_resumes_and_saves_a_quantized_model(setup, tmp_path):
    run = tmp_path / "ddtb4"
    train(_cfg(setup, run, "qat", "4", 2), log=lambda s: None)
    train(_cfg(setup, run, "qat", "4", 3), log=lambda s: None)  # resumes at step 2
    rows = read_log(run / "log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    model, card = load_model(run / "best.pt")
    assert model.scheme == "ddtb" and model.blocks[0].conv1.act_bits == [4]
    assert card["task"] == "qat" and card["bits"] == "4" and card["val_psnr_y"] > 20
    # the quantizer ranges were initialised from data, and the student started from the teacher
    assert bool(model.blocks[3].conv1.act_quant["4"].initialized)
    teacher, _ = load_model(setup["teacher"])
    assert torch.allclose(model.head[0].weight, teacher.head[0].weight, atol=0.05)


@pytest.mark.parametrize("scheme", ["pams", "ddtb"])
def test_qat_step_lowers_loss_on_a_fixed_batch(setup, tmp_path, scheme):
    """One plain gradient step on the QAT loss (STE through the 4-bit quantizers) lowers it.
    The teacher here is a random network, so that quantization actually changes the output
    (the interpolating initialisation has all-zero residual branches)."""
    from refqsr_engine.training.datasets import HRFolderDataset, collate
    from refqsr_engine.training.tasks import make_task

    torch.manual_seed(0)
    save_model(tmp_path / "random_teacher.pt", build_sr("srresnet"))
    cfg = _cfg(setup, tmp_path / "unused", "qat", "4", 1, scheme=scheme)
    cfg.teacher = str(tmp_path / "random_teacher.pt")
    task = make_task(cfg, HRFolderDataset(setup["root"] / "train", 4, 24))
    batch = collate([task.dataset[i] for i in range(2)])
    task.model.train()
    before = float(task.loss(batch).detach())  # the first call initialises the quantizer ranges
    opt = torch.optim.SGD(task.model.parameters(), lr=1e-2)
    opt.zero_grad()
    task.loss(batch).backward()
    opt.step()
    assert float(task.loss(batch).detach()) < before - 1e-4
    lrs = sorted(g["base_lr"] for g in task.param_groups())
    assert lrs == [1e-4, 1e-2]  # quantizer bounds train with their own, larger step


def test_refqsr_task_trains_on_pairs(setup, tmp_path):
    run = tmp_path / "refqsr"
    train(_cfg(setup, run, "refqsr", "8-4", 2), log=lambda s: None)
    model, card = load_model(run / "best.pt")
    assert isinstance(model, RefQSR) and (model.b_high, model.b_low, model.b_medium) == (8, 4, 6)
    assert model.clustblock is not None and card["task"] == "refqsr" and np.isfinite(card["val_psnr_y"])
    # the ClustBlock is frozen: identical to the file it came from
    clust, _ = load_model(setup["clust"])
    for a, b in zip(model.clustblock.state_dict().values(), clust.state_dict().values()):
        assert torch.equal(a.float(), b.float())


def test_bad_task_settings(setup, tmp_path):
    with pytest.raises(RefQSRError, match="one bit width"):
        train(_cfg(setup, tmp_path / "a", "qat", "8-4", 1), log=lambda s: None)
    with pytest.raises(RefQSRError, match="b_high-b_low"):
        train(_cfg(setup, tmp_path / "b", "refqsr", "8", 1), log=lambda s: None)
    train(_cfg(setup, tmp_path / "c", "qat", "8", 1), log=lambda s: None)
    with pytest.raises(RefQSRError, match="bits=8 run"):
        train(_cfg(setup, tmp_path / "c", "qat", "4", 2), log=lambda s: None)


@pytest.mark.parametrize("task_name,bits", [("fp", "8"), ("qat", "4"), ("refqsr", "8-4")])
def test_bf16_autocast_loss_close_to_fp32(setup, tmp_path, task_name, bits):
    """--amp bf16 changes only the arithmetic of the forward pass: the loss (and so the training
    signal) stays within bf16 rounding of the fp32 loss, and the gradients are finite."""
    from refqsr_engine.training.datasets import HRFolderDataset
    from refqsr_engine.training.tasks import make_task

    torch.manual_seed(0)
    save_model(tmp_path / "random_teacher.pt", build_sr("srresnet"))
    cfg = _cfg(setup, tmp_path / "unused", task_name, bits, 1)
    cfg.teacher = str(tmp_path / "random_teacher.pt")
    task = make_task(cfg, HRFolderDataset(setup["root"] / "train", 4, 24))
    batch = next(iter(task.batches(0, 1)))
    task.model.train()
    fp32 = float(task.loss(batch).detach())  # also initialises the quantizer ranges
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = task.loss(batch)
    assert loss.dtype == torch.float32
    assert abs(float(loss.detach()) - fp32) <= 0.03 * fp32
    loss.backward()
    grads = [p.grad for p in task.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_time_limit_stops_with_a_resumable_checkpoint(setup, tmp_path):
    run = tmp_path / "limited"
    messages: list[str] = []
    out = train(_cfg(setup, run, "qat", "8", 50, time_limit=1e-6), log=messages.append)
    assert out["stopped"] and out["step"] == 1  # one step, then the limit
    assert any("time limit" in m for m in messages)
    assert torch.load(run / "last.pt", weights_only=False)["step"] == 1
    assert train(_cfg(setup, run, "qat", "8", 2), log=lambda s: None)["step"] == 2  # resumes


def test_highbit_tail_ablation_trains_and_round_trips(setup, tmp_path):
    """Table V's w/o-RefER model: no RefER modules; the query path's last blocks run at b_high."""
    run = tmp_path / "norefer"
    train(_cfg(setup, run, "refqsr", "8-4", 1, tail="highbit"), log=lambda s: None)
    model, card = load_model(run / "best.pt")
    assert isinstance(model, RefQSR) and model.tail == "highbit" and len(model.refers) == 0
    assert card["tail"] == "highbit"
    with pytest.raises(RefQSRError, match="tail=highbit run"):  # a resume must not switch variants
        train(_cfg(setup, run, "refqsr", "8-4", 2), log=lambda s: None)


def test_shared_matching_run_starts_from_a_paper_matching_refqsr_model(setup, tmp_path):
    """--matching shared --init-from a paper-matching RefQSR file: its backbone and RefER convs
    carry over (no per-RefER match quantizers), the run trains, and resumes refuse to switch."""
    paper = tmp_path / "paper"
    train(_cfg(setup, paper, "refqsr", "8-4", 1), log=lambda s: None)
    source, _ = load_model(paper / "best.pt")
    from refqsr_engine.training.datasets import HRFolderDataset
    from refqsr_engine.training.tasks import make_task

    run = tmp_path / "shared"
    cfg = _cfg(setup, run, "refqsr", "8-4", 1, matching="shared", init_from=str(paper / "best.pt"))
    start = make_task(cfg, HRFolderDataset(setup["root"] / "train", 4, 24)).model
    assert start.matching == "shared" and not any(".match_quant." in k for k in start.state_dict())
    for name in ("backbone.blocks.2.conv1.conv.weight", "refers.1.conv2.conv.weight"):
        assert torch.equal(start.state_dict()[name], source.state_dict()[name].float())
    train(cfg, log=lambda s: None)
    model, card = load_model(run / "best.pt")
    assert model.matching == "shared" and card["matching"] == "shared"
    assert [int(r["step"]) for r in read_log(run / "log.csv")] == [1]
    with pytest.raises(RefQSRError, match="matching=shared run"):
        train(_cfg(setup, run, "refqsr", "8-4", 2), log=lambda s: None)


def test_refqsr_training_starts_each_refer_near_skipping_its_block(setup, tmp_path):
    """RefER's last refinement conv starts at REFER_INIT_SCALE of PyTorch's default conv init
    (uniform within 1/sqrt(fan_in)) and without bias, so each RefER starts as the identity on the
    query feature (within that scale); its first conv keeps the default init."""
    from refqsr_engine.training.datasets import HRFolderDataset
    from refqsr_engine.training.tasks import REFER_INIT_SCALE, make_task

    task = make_task(
        _cfg(setup, tmp_path / "unused", "refqsr", "8-4", 1), HRFolderDataset(setup["root"] / "train", 4, 24)
    )
    assert len(task.model.refers) == 2
    for refer in task.model.refers:
        last, first = refer.conv2.conv.weight.detach(), refer.conv1.conv.weight.detach()
        bound = 1.0 / np.sqrt(last[0].numel())
        assert 0 < float(last.abs().max()) <= REFER_INIT_SCALE * bound
        assert float(first.abs().max()) > 0.5 * bound  # untouched
        assert refer.conv2.conv.bias is None or not bool(refer.conv2.conv.bias.any())
        q, r = torch.rand(2, 64, 12, 12), torch.rand(2, 64, 12, 12)
        with torch.no_grad():
            out = refer(q, r, hard=True)
        assert float((out - q).abs().max()) < 0.05 * float(q.abs().max())


@pytest.mark.parametrize("scheme", ["ddtb", "pams"])
def test_quantized_conv_keeps_its_8_bit_grid_under_bf16_autocast(scheme):
    """Under autocast the fake-quantized operands are convolved in fp32: the result equals a
    float64 conv of the same grid values (bf16 would move them off the 8-bit grid)."""
    from refqsr_engine.models.qconv import BitSpec, QuantConv2d

    torch.manual_seed(4)
    conv = QuantConv2d(16, 8, 3, scheme=scheme, act_bits=(8,)).train()
    x = torch.randn(2, 16, 12, 12) * 3
    conv(x, BitSpec.uniform(8))  # first training forward: the activation range
    conv.eval()
    xq = conv.quantize_input(x, 8).double()
    wq = conv.quantized_weight(8).double()
    want = torch.nn.functional.conv2d(xq, wq, conv.conv.bias.double(), padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = conv(x, BitSpec.uniform(8))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_distillation_target_is_the_fp32_teacher_under_autocast(setup, tmp_path):
    from refqsr_engine.training.datasets import HRFolderDataset
    from refqsr_engine.training.tasks import make_task

    task = make_task(_cfg(setup, tmp_path / "unused", "qat", "8", 1), HRFolderDataset(setup["root"] / "train", 4, 24))
    lr, hr = torch.rand(2, 3, 24, 24), torch.rand(2, 3, 96, 96)
    student = torch.zeros_like(hr)
    with torch.no_grad():
        target = task.teacher(lr)
        want = float(torch.nn.functional.l1_loss(student, hr) + torch.nn.functional.l1_loss(student, target))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = float(task.distill(student, lr, hr))
    assert got == pytest.approx(want, rel=1e-6)


def test_refer_only_training_moves_the_refers_and_nothing_else(setup, tmp_path):
    """--train refer: the gradient reaches the RefER blocks only; the loss is loss (9)'s query
    terms (checked against the two L1s computed here); the saved model keeps every backbone
    tensor of its --init-from file and changes the RefERs; resumes refuse to switch."""
    from refqsr_engine.training.datasets import HRFolderDataset
    from refqsr_engine.training.tasks import make_task

    source_run = tmp_path / "source"
    train(_cfg(setup, source_run, "refqsr", "8-4", 1, matching="shared"), log=lambda s: None)
    source = source_run / "best.pt"
    cfg = _cfg(
        setup,
        tmp_path / "refer",
        "refqsr",
        "8-4",
        2,
        matching="shared",
        init_from=str(source),
        train_part="refer",
        lr=1e-2,
        lr_quant=1e-2,
    )
    task = make_task(cfg, HRFolderDataset(setup["root"] / "train", 4, 24))
    batch = next(task.batches(0, 1))
    task.model.train()
    loss = task.loss(batch)
    loss.backward()
    for name, p in task.model.named_parameters():
        assert (p.grad is not None) == name.startswith("refers."), name
    with torch.no_grad():
        sr_q, _ = task.model(batch["query_lr"], batch["ref_lr"])
        l1 = torch.nn.functional.l1_loss
        want = l1(sr_q, batch["query_hr"]) + l1(sr_q, task.teacher(batch["query_lr"]))
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)

    train(cfg, log=lambda s: None)
    start, _ = load_model(source)
    model, card = load_model(tmp_path / "refer" / "best.pt")
    assert card["trained"] == "RefER blocks only"
    before, after = start.state_dict(), model.state_dict()
    for key, value in after.items():
        if not key.startswith(("refers.", "clustblock.")):
            assert torch.equal(value, before[key]), key
    assert not torch.equal(after["refers.0.conv1.conv.weight"], before["refers.0.conv1.conv.weight"])
    with pytest.raises(RefQSRError, match="train_part=refer run"):
        train(
            _cfg(setup, tmp_path / "refer", "refqsr", "8-4", 3, matching="shared", init_from=str(source)),
            log=lambda s: None,
        )
    with pytest.raises(RefQSRError, match="highbit ablation has none"):
        train(
            _cfg(setup, tmp_path / "x", "refqsr", "8-4", 1, tail="highbit", init_from=str(source), train_part="refer"),
            log=lambda s: None,
        )
    with pytest.raises(RefQSRError, match="--init-from"):
        train(_cfg(setup, tmp_path / "y", "refqsr", "8-4", 1, train_part="refer"), log=lambda s: None)


def test_fresh_refer_keeps_the_source_backbone_and_restarts_the_refers(setup, tmp_path):
    """--fresh-refer --init-from a RefQSR model: every backbone tensor comes from the file, each
    RefER starts afresh as 'skip the replaced block' (refinement conv at REFER_INIT_SCALE)."""
    from refqsr_engine.training.datasets import HRFolderDataset
    from refqsr_engine.training.tasks import REFER_INIT_SCALE, make_task

    source_run = tmp_path / "source"
    train(_cfg(setup, source_run, "refqsr", "8-4", 1, matching="shared", lr=1e-2), log=lambda s: None)
    source, _ = load_model(source_run / "best.pt")
    cfg = _cfg(
        setup,
        tmp_path / "unused",
        "refqsr",
        "8-4",
        1,
        matching="shared",
        init_from=str(source_run / "best.pt"),
        fresh_refer=True,
    )
    model = make_task(cfg, HRFolderDataset(setup["root"] / "train", 4, 24)).model
    before, after = source.state_dict(), model.state_dict()
    for key in after:
        if key.startswith("backbone."):
            assert torch.equal(after[key], before[key].float()), key
    for k, refer in enumerate(model.refers):
        last = refer.conv2.conv.weight.detach()
        assert float(last.abs().max()) <= REFER_INIT_SCALE / np.sqrt(last[0].numel())
        assert float(before[f"refers.{k}.conv2.conv.weight"].float().abs().max()) > 10 * float(last.abs().max())


def test_refer_kd_adds_the_feature_target_of_each_refer(setup, tmp_path):
    """--refer-kd W: the loss is loss (9)'s query terms plus W times the mean over RefERs of
    L1(RefER output, output of the block it replaces with the query patch wholly at b_high); both
    features are taken here with forward hooks on a plain backbone call at b_high. Refused where
    there is no RefER or no single b_high."""
    from refqsr_engine.models.qconv import BitSpec
    from refqsr_engine.training.datasets import HRFolderDataset
    from refqsr_engine.training.tasks import make_task

    source_run = tmp_path / "source"
    train(_cfg(setup, source_run, "refqsr", "8-4", 1, matching="shared"), log=lambda s: None)
    weight = 0.5
    cfg = _cfg(
        setup,
        tmp_path / "kd",
        "refqsr",
        "8-4",
        1,
        matching="shared",
        init_from=str(source_run / "best.pt"),
        train_part="refer",
        refer_kd=weight,
    )
    task = make_task(cfg, HRFolderDataset(setup["root"] / "train", 4, 24))
    batch = next(task.batches(0, 1))
    task.model.train()
    loss = float(task.loss(batch).detach())

    model, hooked = task.model, {}
    first = model.backbone.n_blocks - len(model.refers)
    handles = [
        m.register_forward_hook(lambda mod, args, out, key=key: hooked.__setitem__(key, out.detach()))
        for key, m in [(("refer", k), r) for k, r in enumerate(model.refers)]
        + [(("high", k), model.backbone.blocks[first + k]) for k in range(len(model.refers))]
    ]
    l1 = torch.nn.functional.l1_loss
    with torch.no_grad():
        sr_q, _ = model(batch["query_lr"], batch["ref_lr"])
        model.backbone(batch["query_lr"], BitSpec(8, 8))
    for h in handles:
        h.remove()
    feature = sum(l1(hooked[("refer", k)], hooked[("high", k)]) for k in range(len(model.refers))) / len(model.refers)
    image = l1(sr_q, batch["query_hr"]) + l1(sr_q, task.teacher(batch["query_lr"]))
    assert float(feature) > 1e-4
    assert loss == pytest.approx(float(image + weight * feature), rel=1e-5)

    with pytest.raises(RefQSRError, match="--refer-kd needs RefER blocks"):
        make_task(
            _cfg(setup, tmp_path / "x", "refqsr", "8-4", 1, tail="highbit", refer_kd=weight),
            HRFolderDataset(setup["root"] / "train", 4, 24),
        )
