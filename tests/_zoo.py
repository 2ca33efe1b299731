"""Small real models for tests/test_realmodels.py and benchmarks/bench_models.py.

Hugging Face GPT-2 and BERT are built from their own configs (random init, tiny sizes) when
``transformers`` imports. timm and torchvision do not import next to the CPU torch wheel here
(timm imports torchvision, whose PyPI wheel links CUDA libraries), so the ViT and the ResNet
are hand-written equivalents of ``timm.models.vision_transformer`` (``Attention`` with
``fused_attn``: ``F.scaled_dot_product_attention``) and ``torchvision.models.resnet``
(``BasicBlock``, BatchNorm) at small widths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention
from torch import Tensor, nn


def transformers_or_none() -> Any:
    """``transformers`` (the optional ``realmodels`` test extra), or None when it does not import."""
    try:
        import transformers
    except Exception:  # pragma: no cover - depends on the environment
        return None
    return transformers


@dataclass
class Case:
    name: str
    model: nn.Module
    inputs: Any
    targets: Tensor
    loss: str  # cross_entropy / mse


class LogitsOnly(nn.Module):
    """Hugging Face models return a ModelOutput: keep the logits (flattened per token)."""

    def __init__(self, inner: nn.Module, per_token: bool) -> None:
        super().__init__()
        self.inner = inner
        self.per_token = per_token

    def forward(self, ids: Tensor) -> Tensor:
        logits = self.inner(input_ids=ids).logits
        return logits.transpose(1, 2) if self.per_token else logits  # (N, C, T) per token


class SeqClassifier(nn.Module):
    """Tokens -> embedding (with a padding row) -> RNN/LSTM/GRU -> linear on the last state."""

    def __init__(self, kind: str, vocab: int = 11, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width, padding_idx=0)
        cls = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[kind]
        self.rnn = cls(width, width, batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, ids: Tensor) -> Tensor:
        out, _ = self.rnn(self.emb(ids))
        return self.head(out[:, -1])


class MHAModel(nn.Module):
    def __init__(self, width: int = 4, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.head(out.mean(1))


class SDPAModel(nn.Module):
    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(out.squeeze(1).mean(1))


class ViTAttention(nn.Module):
    """timm's ``Attention`` with ``fused_attn=True``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ViTAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """timm's VisionTransformer layout: patch conv, cls token, position embedding, blocks, head."""

    def __init__(self, img: int = 4, patch: int = 2, dim: int = 4, heads: int = 2, classes: int = 3):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(ViTBlock(dim, heads))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class BasicBlock(nn.Module):
    """torchvision's ``resnet.BasicBlock``."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + idt)


class TinyResNet(nn.Module):
    """torchvision's ResNet-18 layout (stem, BasicBlocks, average pool, fc) at small widths."""

    def __init__(self, width: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean((2, 3)))


def _perturb_buffers(model: nn.Module, g: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(1 + torch.rand(m.running_var.shape, generator=g))


def build(name: str, dtype: torch.dtype = torch.float64, batch: int = 2, bench: bool = False) -> Case:
    """A seeded small model with its data, in ``dtype`` (``bench=True``: the larger sizes of
    ``benchmarks/bench_models.py``, e.g. GPT-2 with a 256 vocabulary, width 32, 16 tokens)."""
    w = 8 if bench else 1  # width multiplier
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name.startswith(("gpt2", "bert")):
        transformers = transformers_or_none()
        if transformers is None:
            raise RuntimeError("transformers is not installed")
        attn = "eager" if name.endswith("eager") else "sdpa"
        vocab, seq = (256, 16) if bench else (7, 4)
        if name.startswith("gpt2"):
            cfg = transformers.GPT2Config(
                vocab_size=vocab, n_positions=seq, n_embd=4 * w, n_layer=2 if bench else 1, n_head=2,
                bos_token_id=0, eos_token_id=0, attn_implementation=attn,
            )  # fmt: skip
            model = LogitsOnly(transformers.GPT2LMHeadModel(cfg), per_token=True)
            ids = torch.randint(0, vocab, (batch, seq), generator=g)
            targets = torch.randint(0, vocab, (batch, seq), generator=g)
        else:
            cfg = transformers.BertConfig(
                vocab_size=vocab, hidden_size=4 * w, num_hidden_layers=2 if bench else 1,
                num_attention_heads=2, intermediate_size=8 * w, max_position_embeddings=seq, type_vocab_size=1, num_labels=3,
                pad_token_id=0, attn_implementation=attn,
            )  # fmt: skip
            model = LogitsOnly(transformers.BertForSequenceClassification(cfg), per_token=False)
            ids = torch.randint(1, vocab, (batch, seq), generator=g)
            ids[:, -1] = 0  # a [PAD] token in every sequence
            targets = torch.randint(0, 3, (batch,), generator=g)
        model = model.to(dtype).eval()
        return Case(name, model, ids, targets, "cross_entropy")
    if name in ("rnn", "lstm", "gru"):
        model = SeqClassifier(name, width=4 * w).to(dtype)
        ids = torch.randint(1, 11, (batch, 16 if bench else 3), generator=g)
        ids[0, 0] = 0
        return Case(name, model, ids, torch.randint(0, 3, (batch,), generator=g), "cross_entropy")
    if name in ("mha", "sdpa"):
        model = (MHAModel(4 * w) if name == "mha" else SDPAModel(4 * w)).to(dtype).eval()
        x = torch.randn(batch, 16 if bench else 3, 4 * w, generator=g, dtype=dtype)
        return Case(name, model, x, torch.randint(0, 3, (batch,), generator=g), "cross_entropy")
    if name == "vit":
        img = 16 if bench else 4
        model = TinyViT(img=img, patch=4 if bench else 2, dim=4 * w).to(dtype).eval()
        x = torch.randn(batch, 3, img, img, generator=g, dtype=dtype)
        return Case(name, model, x, torch.randint(0, 3, (batch,), generator=g), "cross_entropy")
    if name.startswith("resnet"):
        model = TinyResNet(width=2 * w).to(dtype)
        with torch.no_grad():
            _perturb_buffers(model, g)
        model.train(name.endswith("train"))
        img = 16 if bench else 4
        x = torch.randn(batch, 3, img, img, generator=g, dtype=dtype)
        return Case(name, model, x, torch.randint(0, 3, (batch,), generator=g), "cross_entropy")
    raise KeyError(name)


NAMES = ["gpt2", "gpt2_eager", "bert", "bert_eager", "rnn", "lstm", "gru", "mha", "sdpa", "vit",
         "resnet_eval", "resnet_train"]  # fmt: skip


def state_snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def loss_of(case: Case) -> Callable[[Tensor, Tensor], Tensor]:
    return {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}[case.loss]


class ResNet18(nn.Module):
    """torchvision's ``resnet18()`` architecture, built from its source layout (the PyPI
    torchvision wheel does not import next to the CPU torch): 7×7 stem with max pooling, four
    stages of two :class:`BasicBlock` (64, 128, 256, 512 channels), average pooling and a
    ``classes``-way linear head; 11.7M parameters for 1,000 classes (``width`` scales the
    channels: 64 is torchvision's)."""

    def __init__(self, classes: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, cin, stages = (width, 2 * width, 4 * width, 8 * width), width, []
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(8 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18_case(
    batch: int = 8, img: int = 32, classes: int = 1000, dtype: torch.dtype = torch.float32, width: int = 64
) -> Case:
    """ResNet-18 in eval mode (perturbed running statistics) on ``batch`` random ``img``×``img``
    images with ``classes``-way targets."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ResNet18(classes, width).to(dtype)
    with torch.no_grad():
        _perturb_buffers(model, g)
    model.eval()
    x = torch.randn(batch, 3, img, img, generator=g, dtype=dtype)
    return Case("resnet18", model, x, torch.randint(0, classes, (batch,), generator=g), "cross_entropy")
