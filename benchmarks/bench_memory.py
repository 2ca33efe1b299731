"""Peak memory of Hessian- and GGN-vector products on a GPT-2-shaped model with a 50,257 vocabulary.

The model: Hugging Face ``GPT2LMHeadModel`` built from its config with the real vocabulary
(50,257 entries, tied input/output embedding) and small widths (``n_embd=32``, 2 layers, 2
heads), batch 4 × 64 tokens, mean cross-entropy over every token; float32. The logits are
4·64·50,257 floats = 51 MB per copy, the embedding 6.4 MB, so the logits dominate every peak.

Measured (each in a fresh process, so that nothing is cached from another measurement):

* one gradient (``torch.autograd.grad`` of the loss) — the reference;
* ``hvp(f)`` (one Hessian-vector product, the default strategy; ``F.cross_entropy`` is
  differentiated with the closed-form softmax curvature, ``secorder._losses.closed_form_losses``,
  so no double backward of ``log_softmax`` runs over the logits);
* one Hutchinson quadratic form of the Hessian (``hessian_operator(...).quadform``, the default
  ``"auto"``: the Taylor tape when it records);
* one GGN-vector product (``fisher_operator(model, "cross_entropy")`` ``matmat``) and one GGN
  quadratic form (``quadform``: one JVP, which recomputes the logits, and the closed-form
  softmax curvature diag(p) − ppᵀ applied a group of samples at a time without forming it).

Target (issue 13): at most 2× a gradient's peak for each call.

How: CPU, peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, a high-water
mark) after the measured call minus the high-water mark before it (model built, inputs made,
one forward pass already run under ``no_grad`` so that lazy initialization is not counted).
glibc returns large blocks to the system on free, so the delta is the transient peak of the
call, in MB. ``torch.cuda.max_memory_allocated`` would be the GPU analogue.

Usage: ``PYTHONPATH=. python benchmarks/bench_memory.py [--seq 64 --batch 4]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import _common as C  # noqa: N812 - short alias for the shared helpers
import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention

WHAT = ["gradient", "hvp", "hessian quadform", "ggn matmat", "ggn quadform"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def worker(what: str, batch: int, seq: int) -> dict[str, float]:
    import transformers

    import secorder

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=seq)
    inner = transformers.GPT2LMHeadModel(cfg).eval()

    class LM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=ids).logits.transpose(1, 2)  # (N, V, T)

    model = LM()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    y = torch.randint(0, cfg.vocab_size, (batch, seq))
    f, params = secorder.module_loss(model, F.cross_entropy)
    g = torch.Generator().manual_seed(0)
    v = {k: torch.randn(p.shape, generator=g) for k, p in params.items()}
    P = sum(p.numel() for p in params.values())
    V = torch.randn(1, P, generator=g)
    with torch.no_grad():
        model(ids)
    before = _rss_mb()
    if what == "gradient":
        ps = {k: p.detach().requires_grad_(True) for k, p in params.items()}
        torch.autograd.grad(f(ps, ids, y), list(ps.values()))
    elif what == "hvp":
        secorder.hvp(f)(v, params, ids, y)
    elif what == "hessian quadform":
        op, _ = secorder.hessian_operator(f, params, ids, y)
        op.quadform(V)
    elif what == "ggn matmat":
        op, _ = secorder.fisher_operator(model, "cross_entropy")(params, ids, y)
        op.matmat(V)
    elif what == "ggn quadform":
        op, _ = secorder.fisher_operator(model, "cross_entropy")(params, ids, y)
        op.quadform(V)
    return {"peak_mb": _rss_mb() - before, "params": P, "logits_mb": batch * seq * cfg.vocab_size * 4 / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--worker", default=None)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.batch, a.seq)))
        return
    res = {}
    for what in WHAT:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", what, "--batch", str(a.batch), "--seq", str(a.seq)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        res[what] = json.loads(out.stdout.strip().splitlines()[-1])
    ref = res["gradient"]["peak_mb"]
    logits = res["gradient"]["logits_mb"]
    print(
        f"GPT-2 shape, vocabulary 50,257, n_embd=32, 2 layers, batch {a.batch} × {a.seq} tokens, "
        f"{res['gradient']['params']:,} parameters; one copy of the logits = {logits:.0f} MB. "
        "Peak RSS increase of one call (fresh process each, CPU float32).\n"
    )
    rows = [[w, f"{r['peak_mb']:.0f} MB", f"{r['peak_mb'] / ref:.2f}×", f"{r['peak_mb'] / logits:.1f}"]
            for w, r in res.items()]  # fmt: skip
    print(C.table(rows, ["call", "peak", "vs one gradient", "logit copies"]))


if __name__ == "__main__":
    main()
