"""Tiny models the core tests share."""

import torch
from torch import nn


class MatmulMLP(nn.Module):
    """Dense layers captured in three forms: linear, matmul + bias add, addmm."""

    def __init__(self, d_in=8, d_hidden=16, d_out=4):
        super().__init__()
        self.fc = nn.Linear(d_in, d_hidden)
        self.w2 = nn.Parameter(torch.randn(d_hidden, d_hidden) / 4)  # stored (in, out)
        self.b2 = nn.Parameter(torch.randn(d_hidden))
        self.w3 = nn.Parameter(torch.randn(d_out, d_hidden) / 4)     # stored (out, in)
        self.b3 = nn.Parameter(torch.randn(d_out))

    def forward(self, x):                        # (B, T, d_in)
        h = torch.relu(self.fc(x))               # (B, T, d_hidden)
        h = torch.matmul(h, self.w2) + self.b2   # matmul + add
        flat = h.reshape(-1, h.shape[-1])        # (B*T, d_hidden)
        out = torch.addmm(self.b3, flat, self.w3.t())
        return out.reshape(x.shape[0], x.shape[1], -1)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor's value
            return self.inner(x)
        return -x
