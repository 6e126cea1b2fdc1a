"""Which SGD learning rate lets a re-initialized heat student fit its teacher?

The first heat step's objective has a scale set by the fidelity space: with ``logits`` it starts near
half the summed variance of the teacher's logits (hundreds for a confident standard network), with
``softmax`` below 0.5. One learning rate cannot serve both on a network without normalization layers:
too large and every ReLU dies (the student outputs a constant), too small and the student does not move.
This probe trains the first step's student from its seeded initialization for a few batches per
learning rate and reports the objective's parts, the gradient norm and the batch accuracy, so the
``lr`` of a heat study is chosen from measurements (``params/mnist/heat_cpu.yaml`` uses it).

    python benchmarks/heat_student_lr.py TEACHER.pt --fidelity logits --gamma 5 --lr 0.01 0.001 \
        [--batches 120] [--data-dir DIR] [--dataset mnist] [--arch lenet_caffe] [--sigma 0.25]

Results go to ``benchmarks/results/heat_student_lr_<fidelity>.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rslib.nn import architectures, checkpoints, heat
from rslib.nn.data import load_dataset
from rslib.util.files import atomic_write_json
from rslib.util.provenance import provenance

BATCH = 256


def probe(teacher: torch.nn.Module, loader, config: heat.HeatConfig, arch: str, dataset: str, lr: float,
          batches: int, report_every: int) -> list[dict[str, float]]:
    """Train a fresh student for ``batches`` batches at ``lr``; the objective's parts every few batches."""
    torch.manual_seed(1)
    student = architectures.build_model(arch, dataset).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    rows, start = [], time.perf_counter()
    for index, (x, y) in enumerate(loader):
        if index == batches:
            break
        x = x.contiguous(memory_format=torch.channels_last)
        target = heat.teacher_outputs(teacher, x, config.fidelity)
        loss, parts = heat.heat_step_loss(student, target, x, config)
        optimizer.zero_grad()
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), float("inf")))
        optimizer.step()
        if index % report_every == 0 or index == batches - 1:
            with torch.no_grad():
                accuracy = float((student(x).argmax(1) == y).float().mean())
            rows.append({"batch": index, **parts, "grad_norm": grad_norm, "batch_accuracy": accuracy,
                         "seconds": time.perf_counter() - start})
            print(f"lr {lr:g} batch {index}: fidelity {parts['fidelity']:.4g}, weighted penalty "
                  f"{parts['weighted_penalty']:.3g}, grad norm {grad_norm:.3g}, accuracy {accuracy:.3f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", type=Path, help="the heat base checkpoint (an rslib .pt)")
    parser.add_argument("--fidelity", choices=heat.FIDELITIES, default="logits")
    parser.add_argument("--gamma", type=float, default=5.0)
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--lr", type=float, nargs="+", default=[0.01, 0.001])
    parser.add_argument("--batches", type=int, default=120)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--arch", default="lenet_caffe")
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()

    teacher = checkpoints.load(args.teacher).eval().requires_grad_(False)
    train_set = load_dataset(args.dataset, "train", data_dir=args.data_dir, download=True)
    loader = torch.utils.data.DataLoader(train_set, batch_size=BATCH, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    config = heat.HeatConfig(steps=args.steps, gamma=args.gamma, sigma=args.sigma, draws=args.draws,
                             fidelity=args.fidelity)
    results = {str(lr): probe(teacher, loader, config, args.arch, args.dataset, lr, args.batches, 20)
               for lr in args.lr}
    out = Path(__file__).parent / "results" / f"heat_student_lr_{args.fidelity}.json"
    config_json = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    atomic_write_json(out, {"config": config_json, "results": results, "provenance": provenance()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
