"""Training with fxfeat on a GPU: what the CPU tests check, on CUDA, as a user fine-tuning there would run it.

    PYTHONPATH=. python -m benchmarks.training_gpu [--out results.json] [--device cuda|cpu]

Checks, each reported pass/fail with its measure:
- compiling a model on the GPU, in train mode, leaves its buffers and the CPU and CUDA random states as they were;
- train-mode outputs and gradients of an extractor with drop path equal the eager model's with hooks (same seed,
  deterministic cuDNN);
- a Faster R-CNN on ``fxfeat.backbone`` trains a few steps (fp32 and bf16 autocast) with the first levels frozen,
  and a whole detector saved with ``torch.save`` and loaded again detects the same boxes;
- ``fxfeat.freeze(norm="frozen")`` puts its frozen norms on the model's device.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import platform
import sys
import time

import torch

from benchmarks.references import captured_outputs


def _hooked(model, extractor, x):
    info = extractor.feature_info
    captured = captured_outputs(model, info.module_name(), x, flows_on=True)
    return [captured[info[i]["module"]][0] for i in info.out_indices]


def check_compile_leaves_state(device):
    import torchvision

    import fxfeat

    model = torchvision.models.resnet50().to(device).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cuda = device.type == "cuda"
    cpu_state, cuda_state = torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None
    start = time.perf_counter()
    fxfeat.compile(model)
    seconds = time.perf_counter() - start
    same = all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    ok = same and torch.equal(cpu_state, torch.get_rng_state()) and (
        not cuda or torch.equal(cuda_state, torch.cuda.get_rng_state()))
    return ok, f"resnet50 compiled in {seconds:.2f} s on {device}; buffers and random states kept: {ok}"


def check_gradients_equal_eager(device):
    import timm

    import fxfeat

    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    model = timm.create_model("convnext_atto", drop_path_rate=0.5).to(device).train()
    reference = copy.deepcopy(model)
    extractor = fxfeat.compile(model)
    x = torch.randn(4, 3, 128, 128, device=device)
    torch.manual_seed(3)
    features = extractor(x)
    torch.manual_seed(3)
    expected = _hooked(reference, extractor, x)
    weights = [torch.randn_like(f) for f in features]
    sum((f * w).sum() for f, w in zip(features, weights)).backward()
    sum((f * w).sum() for f, w in zip(expected, weights)).backward()
    outputs = max((a - b).abs().max().item() for a, b in zip(features, expected))
    grads = dict(reference.named_parameters())
    gradient = max((p.grad - grads[n].grad).abs().max().item() for n, p in extractor.named_parameters())
    ok = outputs == 0.0 and gradient <= 1e-5
    return ok, f"convnext_atto drop path 0.5: max output difference {outputs:g}, max gradient difference {gradient:g}"


def check_detector(device):
    import timm
    from torchvision.models.detection import FasterRCNN

    import fxfeat

    model = timm.create_model("convnext_atto", drop_path_rate=0.1).to(device)
    backbone = fxfeat.backbone(model, fpn_channels=64)
    fxfeat.freeze(backbone, up_to=0)
    detector = FasterRCNN(backbone, num_classes=3, min_size=256, max_size=320).to(device)
    images = [torch.rand(3, 240, 300, device=device), torch.rand(3, 280, 220, device=device)]
    boxes = torch.tensor([[10.0, 12.0, 120.0, 150.0], [60.0, 40.0, 200.0, 120.0]], device=device)
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2], device=device)} for _ in images]
    optimizer = torch.optim.SGD([p for p in detector.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    detector.train()
    losses = []
    for step in range(6):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=step >= 3):
            loss = sum(detector(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    detector.eval()
    buffer = io.BytesIO()
    torch.save(detector, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False, map_location=device).eval()
    with torch.no_grad():
        first, second = detector(images), loaded(images)
    same = all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(first, second))
    frozen = not backbone.body.get_submodule("stem.0").weight.requires_grad
    ok = all(math.isfinite(v) for v in losses) and same and frozen
    return ok, (f"Faster R-CNN on timm convnext_atto: losses {', '.join(f'{v:.3f}' for v in losses)} (steps 4-6 bf16); "
                f"saved and loaded detector gives the same boxes: {same}; stem frozen: {frozen}")


def check_frozen_norms_on_device(device):
    import torchvision

    import fxfeat

    extractor = fxfeat.compile(torchvision.models.resnet18().to(device), out_indices=(1, 2, 3, 4))
    fxfeat.freeze(extractor, up_to=2, norm="frozen")
    norm = extractor.get_submodule("layer2.1.bn2")
    out = extractor.train()(torch.randn(2, 3, 96, 96, device=device))
    on_device = norm.running_mean.device.type == device.type and all(o.device.type == device.type for o in out)
    ok = type(norm).__name__ == "FrozenBatchNorm2d" and on_device
    return ok, f"FrozenBatchNorm2d on {norm.running_mean.device}; forward in train mode there: {on_device}"


CHECKS = [check_compile_leaves_state, check_gradients_equal_eager, check_detector, check_frozen_norms_on_device]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--device", default="cuda", help="cuda (the point), or cpu to try the script")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    device = torch.device(args.device)
    results = []
    for check in CHECKS:
        start = time.perf_counter()
        try:
            ok, detail = check(device)
        except Exception as error:  # report every check
            ok, detail = False, f"{type(error).__name__}: {error}"
        results.append(dict(check=check.__name__, ok=bool(ok), detail=detail,
                            seconds=round(time.perf_counter() - start, 1)))
        print(f"{'PASS' if ok else 'FAIL'} {check.__name__} ({results[-1]['seconds']} s): {detail}", flush=True)
    import timm
    import torchvision

    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    report = dict(device=name, python=platform.python_version(), torch=torch.__version__,
                  torchvision=torchvision.__version__, timm=timm.__version__, results=results)
    if args.out:
        with open(args.out, "w") as file:
            json.dump(report, file, indent=1)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
