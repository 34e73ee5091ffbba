"""Every ```python block of README.md and docs/*.md runs as written against a small model.

A block may use the names a reader is told to have: ``model`` (a training-mode conv net with
BatchNorm), ``x`` (its input), ``graph_module`` (``symbolic_trace`` of it), ``exported_program``
(``torch.export`` of it), ``dynamo_gm`` (the graph a ``torch.compile`` backend receives),
``running_mean`` / ``running_var`` / ``weight`` / ``bias`` (for ``x``'s channels), ``z`` (a
residual like ``x``) and ``cfg``. Each block runs in a fresh namespace, in a temporary directory.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from bnrewrite import SamplingConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for i, block in enumerate(FENCE.findall(path.read_text())):
            found.append((f"{path.relative_to(ROOT)}#{i}", block))
    return found


BLOCKS = _blocks()


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


def _dynamo_graph(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, example_inputs):  # noqa: ANN001
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(copy.deepcopy(model), backend=capture, fullgraph=True)(x)
    return graphs[0]


def _namespace() -> dict:
    torch.manual_seed(0)
    model = _Block().train()
    x = torch.randn(8, 3, 8, 8)
    return {
        "model": model,
        "x": x,
        "z": torch.randn_like(x),
        "graph_module": torch.fx.symbolic_trace(copy.deepcopy(model)),
        "exported_program": torch.export.export(copy.deepcopy(model), (x,)),
        "dynamo_gm": _dynamo_graph(model, x),
        "running_mean": torch.zeros(3),
        "running_var": torch.ones(3),
        "weight": torch.ones(3),
        "bias": torch.zeros(3),
        "cfg": SamplingConfig(method="bs", ratio=0.5),
    }


def test_the_docs_have_python_blocks():
    names = [name for name, _ in BLOCKS]
    assert any(n.startswith("README.md#") for n in names)
    assert len(BLOCKS) >= 5, names


@pytest.mark.parametrize(("name", "code"), BLOCKS, ids=[name for name, _ in BLOCKS])
def test_python_block_runs_as_written(name, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = _namespace()
    exec(compile(code, name, "exec"), namespace)  # noqa: S102 - our own documentation
