"""The PyTorch side of `convert`: the grouped AlexNet its state dicts load into, in plain
torch.nn (torchvision's own `alexnet()` takes the one-tower exports; torchvision has no
grouped AlexNet).

Needs torch (optional: only this module and the .pth files use it).
- `GroupedAlexNet`: the paper's net as one PyTorch module, the towers as groups=2 in conv2,
  conv4 and conv5; keys conv1.weight ... fc8.bias, as `convert.to_torch_grouped` writes:

      net = GroupedAlexNet(num_classes=1000)
      net.load_state_dict(
        {k: torch.from_numpy(v) for k, v in convert.to_torch_grouped(params).items()}
      )
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alexnet_jax.model.alexnet import make_arch


class _TowerLRN(nn.Module):
  """PyTorch's LRN applied to each of `groups` channel blocks (groups=1: across all maps)."""

  def __init__(self, groups: int, size: int, alpha: float, beta: float, k: float):
    super().__init__()
    self.groups, self.size, self.alpha, self.beta, self.k = groups, size, alpha, beta, k

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return torch.cat(
      [
        F.local_response_norm(g, self.size, self.alpha, self.beta, self.k)
        for g in x.chunk(self.groups, 1)
      ],
      1,
    )


class GroupedAlexNet(nn.Module):
  """The paper's AlexNet (`AlexNet(variant="paper")`): towers as groups, LRN per tower
  (lrn_scope="tower", k=2, alpha 1e-4 not divided by n) or across all maps as Caffe
  (lrn_scope="all", lrn_k=1, lrn_alpha=2e-5). pool5_side: 6 for 227 inputs."""

  def __init__(
    self,
    num_classes: int = 1000,
    towers: int = 2,
    pool5_side: int = 6,
    lrn_scope: str = "tower",
    lrn_k: float = 2.0,
    lrn_n: int = 5,
    lrn_alpha: float = 1e-4,
    lrn_beta: float = 0.75,
    dropout: float = 0.5,
  ):
    super().__init__()
    arch = make_arch("paper", towers)
    c = [w * towers for w in arch.conv_widths]
    f = [w * towers for w in arch.fc_widths]
    self.conv1 = nn.Conv2d(3, c[0], 11, 4)
    self.conv2 = nn.Conv2d(c[0], c[1], 5, padding=2, groups=towers)
    self.conv3 = nn.Conv2d(c[1], c[2], 3, padding=1)  # reads both towers
    self.conv4 = nn.Conv2d(c[2], c[3], 3, padding=1, groups=towers)
    self.conv5 = nn.Conv2d(c[3], c[4], 3, padding=1, groups=towers)
    self.fc6 = nn.Linear(c[4] * pool5_side**2, f[0])
    self.fc7 = nn.Linear(f[0], f[1])
    self.fc8 = nn.Linear(f[1], num_classes)
    # PyTorch divides alpha by n; the paper's alpha is not.
    self.lrn = _TowerLRN(
      towers if lrn_scope == "tower" else 1, lrn_n, lrn_alpha * lrn_n, lrn_beta, lrn_k
    )
    self.pool = nn.MaxPool2d(3, 2)
    self.dropout = nn.Dropout(dropout)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.pool(self.lrn(F.relu(self.conv1(x))))
    x = self.pool(self.lrn(F.relu(self.conv2(x))))
    x = F.relu(self.conv4(F.relu(self.conv3(x))))
    x = torch.flatten(self.pool(F.relu(self.conv5(x))), 1)
    x = self.dropout(F.relu(self.fc6(x)))
    x = self.dropout(F.relu(self.fc7(x)))
    return self.fc8(x)
