"""Small models with known behaviour, shared by several test modules."""

from __future__ import annotations

import os
import socket

import torch
from torch import nn


class Linear2(nn.Module):
    """Two logits (0, w.x + b): class 1 iff w.x + b > 0."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(score), score], dim=1)


def free_port() -> int:
    """A TCP port on localhost that is free right now (for a gloo rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_rank_env(rank: int, world: int, port: int) -> None:
    """The environment torchrun would give process ``rank`` of ``world``; one CPU thread each."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def top_logit_gradient_norms(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``||grad_x f_c(x)||_2`` per input, ``c`` the top class at ``x`` (held fixed); eval mode, modes restored."""
    from rslib.core.modules import eval_mode

    with torch.enable_grad(), eval_mode(model):
        xg = x.detach().clone().requires_grad_(True)
        logits = model(xg)
        (grad,) = torch.autograd.grad(logits.gather(-1, logits.argmax(-1, keepdim=True)).sum(), xg)
    return grad.flatten(1).norm(dim=1)


STAGE_NOTEBOOKS = ("train", "certify", "attack", "cert_plots", "adv_plots")


def toy_stage_notebooks(folder, code) -> None:
    """Write ``<folder>/<stage>.ipynb`` for every stage: a papermill parameters cell, then ``code(stage)``."""
    import nbformat

    folder.mkdir()
    for name in STAGE_NOTEBOOKS:
        nb = nbformat.v4.new_notebook()
        first = nbformat.v4.new_code_cell('params_file = ""\noutput_dir = ""')
        first.metadata["tags"] = ["parameters"]
        nb.cells = [first, nbformat.v4.new_code_cell(code(name))]
        nbformat.write(nb, folder / f"{name}.ipynb")
