"""The normalization math shared by the training layers and the Hugging Face model (torch only)."""

from typing import Optional

import torch
import torch.nn.functional as F


def normalize(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """RMSNorm when ``bias`` is None, else LayerNorm; computed in fp32, returned in x's dtype."""
    xf = x.float()
    if bias is None:
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    else:
        out = F.layer_norm(xf, xf.shape[-1:], weight.float(), bias.float(), eps)
    return out.to(x.dtype)
