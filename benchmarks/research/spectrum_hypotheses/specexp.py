"""Self-contained reduced-scale experiment for issue 15 (1/n spectral regulariser, shallow net).

One run = one configuration; results appended as one JSON line to --out.
Plain torch only (the library's API is in flux); the penalty is the paper's eq. 2, checked
against powerlaw_fast.spec_penalty in check_penalty.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path
import json
import math
import time

import torch
from torch import nn
import torch.nn.functional as F

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- model
class Net(nn.Module):
    """784 - N - 10. bn: none | pre (linear-BN-act, library default) | post (linear-act-BN, authors)."""

    def __init__(self, width: int, act: str, bn: str):
        super().__init__()
        self.lin = nn.Linear(784, width)
        self.bn = nn.BatchNorm1d(width) if bn != "none" else None
        self.bn_mode = bn
        self.act = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}[act]
        self.out = nn.Linear(width, 10)

    def hidden(self, x):
        """Returns (representation fed to the readout, activation output before a post-BN)."""
        h = self.lin(x)
        if self.bn_mode == "pre":
            h = self.bn(h)
        a = self.act(h)
        if self.bn_mode == "post":
            return self.bn(a), a
        return a, a

    def forward(self, x):
        h, a = self.hidden(x)
        return self.out(h), h, a


def reg_repr(h, a, point):
    return h if point == "final" else a


# ----------------------------------------------------------------------------- penalty
def penalty(h, V, *, beta, tau, alpha, norm, form, kappa_grad, sort=True):
    """Paper eq. 2 (form='paper') with the per-batch projected spectrum (eq. 5).

    norm: 'mean' -> beta/N (paper), 'sum' -> beta, 'terms' -> beta/(N-tau+1).
    form: 'paper' -> (r-1)^2 + relu(r-1); 'log' -> (log r)^2 + relu(log r).
    Returns (R, mean term value = sum(terms)/N, lam sorted).
    """
    B, N = h.shape
    Z = (h - h.mean(0, keepdim=True)) @ V
    lam = (Z * Z).sum(0) / (B - 1)
    if sort:
        lam = lam.sort(descending=True).values
    anchor = lam[tau - 1] if kappa_grad else lam[tau - 1].detach()
    n = torch.arange(tau, N + 1, dtype=h.dtype, device=h.device)
    gam = anchor * (tau / n) ** alpha
    r = lam[tau - 1:] / gam
    if form == "paper":
        terms = (r - 1) ** 2 + F.relu(r - 1)
    elif form == "log":
        lr = torch.log(r.clamp_min(1e-12))
        terms = lr ** 2 + F.relu(lr)
    else:
        raise ValueError(form)
    coef = {"mean": beta / N, "sum": beta, "terms": beta / (N - tau + 1)}[norm]
    return coef * terms.sum(), float(terms.detach().sum()) / N, lam


def paper_R_of_spectrum(lam, tau=10, alpha=1.0):
    """Paper penalty per unit beta (beta=1, /N) of a given sorted spectrum."""
    lam = lam.double()
    N = lam.numel()
    n = torch.arange(tau, N + 1, dtype=torch.float64)
    r = lam[tau - 1:] / (lam[tau - 1] * (tau / n) ** alpha)
    return float(((r - 1) ** 2 + F.relu(r - 1)).sum() / N)


# ----------------------------------------------------------------------------- spectra
@torch.no_grad()
def full_covariance(model, X, *, mode, point, chunk):
    """Covariance (float64) of the representation over X. mode 'eval' or 'train' (BN batch
    statistics per chunk of size `chunk`, running stats untouched)."""
    was = model.training
    saved = None
    if mode == "train":
        model.train()
        if model.bn is not None:
            saved = model.bn.momentum
            model.bn.momentum = 0.0
    else:
        model.eval()
    N = model.lin.out_features
    s1 = torch.zeros(N, dtype=torch.float64)
    s2 = torch.zeros(N, N, dtype=torch.float64)
    cnt = 0
    for i in range(0, X.shape[0], chunk):
        h, a = model.hidden(X[i:i + chunk])
        r = reg_repr(h, a, point).double()
        s1 += r.sum(0)
        s2 += r.T @ r
        cnt += r.shape[0]
    if saved is not None:
        model.bn.momentum = saved
    model.train(was)
    mu = s1 / cnt
    return (s2 - cnt * torch.outer(mu, mu)) / (cnt - 1)


def eig_desc(C):
    w, V = torch.linalg.eigh(C)
    return w.flip(0), V.flip(1)


def fit_alpha(lam, start, stop):
    lam = lam.double()
    stop = min(stop, lam.numel())
    seg = lam[start - 1:stop]
    pos = seg > 0
    n = torch.arange(start, stop + 1, dtype=torch.float64)[pos]
    y = torch.log(seg[pos])
    x = torch.log(n)
    xm, ym = x.mean(), y.mean()
    slope = ((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum()
    return float(-slope)


def eff_dim(lam, thr=0.9):
    lam = lam.double().clamp_min(0)
    c = lam.cumsum(0) / lam.sum()
    return int(torch.nonzero(c >= thr)[0]) + 1


def pr_dim(lam):
    lam = lam.double().clamp_min(0)
    return float(lam.sum() ** 2 / (lam ** 2).sum())


# ----------------------------------------------------------------------------- attacks
def fgsm_acc(model, X, y, eps):
    model.eval()
    x = X.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x)[0], y)
    g, = torch.autograd.grad(loss, x)
    xa = (X + eps * g.sign()).clamp(0, 1)
    with torch.no_grad():
        return float((model(xa)[0].argmax(1) == y).float().mean())


def pgd_acc(model, X, y, eps, steps, step_size):
    model.eval()
    xa = X.clone()
    for _ in range(steps):
        xa.requires_grad_(True)
        loss = F.cross_entropy(model(xa)[0], y)
        g, = torch.autograd.grad(loss, xa)
        with torch.no_grad():
            xa = xa + step_size * g.sign()
            xa = torch.min(torch.max(xa, X - eps), X + eps).clamp(0, 1)
    with torch.no_grad():
        return float((model(xa)[0].argmax(1) == y).float().mean())


def input_grad_norm(model, X, y):
    """Mean L1 norm of d CE / d x (the first-order FGSM loss gain per unit eps)."""
    model.eval()
    x = X.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x)[0], y, reduction="sum")
    g, = torch.autograd.grad(loss, x)
    return float(g.abs().sum(1).mean())


# ----------------------------------------------------------------------------- main
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--name", default="run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--act", default="sigmoid")
    p.add_argument("--bn", default="pre", choices=["none", "pre", "post"])
    p.add_argument("--point", default="final", choices=["final", "act"])
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--tau", type=int, default=10)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--norm", default="mean")
    p.add_argument("--form", default="paper")
    p.add_argument("--kappa-grad", action="store_true")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=750)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--refresh", type=int, default=0, help="steps between V refreshes; 0 = epoch start; -1 = current batch; -2 = once, at the start")
    p.add_argument("--vrandom", action="store_true", help="V = a fixed random orthogonal matrix")
    p.add_argument("--ema", type=float, default=0.1, help="refresh -3: weight of the new batch in the EMA covariance")
    p.add_argument("--vmode", default="eval", choices=["eval", "train"])
    p.add_argument("--vsub", type=int, default=60000, help="samples used for a refresh")
    p.add_argument("--ntest", type=int, default=1000)
    p.add_argument("--pgd-steps", type=int, default=20)
    p.add_argument("--warm", type=int, default=0, help="epochs of CE-only before the penalty switches on")
    p.add_argument("--out", default=str(Path(__file__).with_name("results.jsonl")))
    p.add_argument("--save-spec", default="")
    a = p.parse_args()

    t0 = time.time()
    # (archived copy: the runs read a cached tensor file of exactly these arrays, checked equal)
    from powerlaw_fast.paper.datasets import load_mnist
    Xtr, ytr = (t.reshape(t.shape[0], -1) if t.dim() > 1 else t.long()
                for t in load_mnist(None, train=True))
    Xte, yte = (t.reshape(t.shape[0], -1) if t.dim() > 1 else t.long()
                for t in load_mnist(None, train=False))
    torch.manual_seed(a.seed)
    model = Net(a.width, a.act, a.bn)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    N = a.width
    regularise = a.beta > 0
    V = None

    Vrand = torch.linalg.qr(torch.randn(N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(123)))[0].float() if a.vrandom else None

    def refresh():
        if a.vrandom:
            return Vrand
        if a.vsub < Xtr.shape[0]:
            idx = torch.randperm(Xtr.shape[0])[: a.vsub]
            Xs = Xtr[idx]
        else:
            Xs = Xtr
        C = full_covariance(model, Xs, mode=a.vmode, point=a.point, chunk=a.batch)
        return eig_desc(C)[1].float()

    pen_hist = []  # per epoch mean term value (R/beta for mean norm)
    pen_first = None
    Cema = None
    step = 0
    for ep in range(a.epochs):
        model.train()
        on = regularise and ep >= a.warm
        if on and (a.refresh >= 0 or (a.refresh == -2 and V is None)):
            V = refresh()
        perm = torch.randperm(Xtr.shape[0])
        terms_acc, cnt = 0.0, 0
        for i in range(0, Xtr.shape[0] - a.batch + 1, a.batch):
            idx = perm[i:i + a.batch]
            xb, yb = Xtr[idx], ytr[idx]
            if on and a.refresh > 0 and step % a.refresh == 0 and not (i == 0):
                V = refresh()
            logits, h, act = model(xb)
            loss = F.cross_entropy(logits, yb)
            if on:
                r = reg_repr(h, act, a.point)
                if a.refresh == -3:
                    with torch.no_grad():
                        rc = (r - r.mean(0)).double()
                        Cb = (rc.T @ rc) / (a.batch - 1)
                        Cema = Cb if Cema is None else (1 - a.ema) * Cema + a.ema * Cb
                        V = eig_desc(Cema)[1].float()
                if a.refresh == -1:
                    with torch.no_grad():
                        rc = r - r.mean(0)
                        V = eig_desc((rc.T.double() @ rc.double()) / (a.batch - 1))[1].float()
                R, tv, _ = penalty(r, V, beta=a.beta, tau=a.tau, alpha=a.alpha, norm=a.norm,
                                   form=a.form, kappa_grad=a.kappa_grad)
                loss = loss + R
                terms_acc += tv
                cnt += 1
                if pen_first is None:
                    pen_first = tv
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        pen_hist.append(terms_acc / max(cnt, 1) if cnt else None)
    t_train = time.time() - t0

    # ------------------------------------------------------------------ evaluation
    model.eval()
    with torch.no_grad():
        clean10k = float((model(Xte)[0].argmax(1) == yte).float().mean())
    Xe, ye = Xte[: a.ntest], yte[: a.ntest]
    res = dict(vars(a))
    res.update(clean10k=clean10k)
    with torch.no_grad():
        res["clean"] = float((model(Xe)[0].argmax(1) == ye).float().mean())
    for eps in (0.05, 0.1):
        res[f"fgsm{eps}"] = fgsm_acc(model, Xe, ye, eps)
        res[f"pgd{eps}"] = pgd_acc(model, Xe, ye, eps, a.pgd_steps, 0.01)
    res["gradL1"] = input_grad_norm(model, Xe, ye)
    specs = {}
    for pt in ["final", "act"] if a.bn == "post" else ["final"]:
        C = full_covariance(model, Xtr, mode="eval", point=pt, chunk=3000)
        lam = torch.linalg.eigvalsh(C).flip(0)
        specs[pt] = lam
        sfx = "" if pt == a.point or a.bn != "post" else "_other"
        res["alpha10_100" + sfx] = fit_alpha(lam, 10, 100)
        res["alpha10_N" + sfx] = fit_alpha(lam, 10, N)
        res["alpha100_N" + sfx] = fit_alpha(lam, 100, N)
        res["d90" + sfx] = eff_dim(lam)
        res["pr" + sfx] = pr_dim(lam)
        res["Rtrue" + sfx] = paper_R_of_spectrum(lam, a.tau)
        # how far below the 1/n line (anchored at tau) the last rank sits
        res["tail_gap" + sfx] = float(lam[a.tau - 1] * a.tau / N / lam[N - 1].clamp_min(1e-30))
        res["trace" + sfx] = float(lam.clamp_min(0).sum())
    res["readout_norm"] = float(model.out.weight.detach().norm())
    res["pen_first"] = pen_first
    res["pen_hist"] = pen_hist
    res["t_train"] = t_train
    res["t_total"] = time.time() - t0
    if a.save_spec:
        torch.save({k: v for k, v in specs.items()}, a.save_spec)
    with open(a.out, "a") as f:
        f.write(json.dumps(res) + "\n")
    keys = ["name", "seed", "beta", "clean10k", "pgd0.05", "pgd0.1", "fgsm0.05", "alpha10_100",
            "alpha10_N", "d90", "pr", "Rtrue", "tail_gap", "pen_first", "t_total"]
    print(" ".join(f"{k}={res[k]:.3g}" if isinstance(res[k], float) else f"{k}={res[k]}" for k in keys),
          "pen_hist=", [round(x, 3) if x is not None else None for x in pen_hist], flush=True)


if __name__ == "__main__":
    main()
