"""Markdown table of every run in results.jsonl (settings -> metrics)."""
import json, sys
from pathlib import Path
rows = [json.loads(l) for l in open(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("results.jsonl"))]
def ref(r):
    return {0: "epoch", -1: "batch", -2: "once", -3: f"EMA{r.get('ema')}"}.get(r["refresh"], f"{r['refresh']} steps" + ("" if r["vsub"] >= 60000 else f" ({r['vsub']//1000}k)"))
hdr = ["run", "seed", "act", "BN", "reg. output", "beta", "norm/form", "V refresh", "V stats", "kappa", "lr", "B", "ep",
       "clean (10k)", "FGSM .05", "PGD .05", "FGSM .1", "PGD .1", "alpha 10-100", "alpha 10-N", "d90", "PR", "R_true", "tail gap", "penalty first -> last", "|dL/dx|_1"]
print("| " + " | ".join(hdr) + " |")
print("|" + "---|" * len(hdr))
for r in rows:
    reg = r["beta"] > 0
    ph = [x for x in r["pen_hist"] if x is not None]
    pen = f"{r['pen_first']:.2f} -> {ph[-1]:.2f}" if reg and ph else "-"
    vals = [r["name"], r["seed"], r["act"], r["bn"], (("BN out" if r["point"] == "final" else "act out") if r["bn"] == "post" else "act out"),
            f"{r['beta']:g}" if reg else "0", f"{r['norm']}/{r['form']}" if reg else "-",
            ("random" if r.get("vrandom") else ref(r)) if reg else "-", r["vmode"] if reg and r["refresh"] >= 0 else "-",
            ("grad" if r["kappa_grad"] else "detached") if reg else "-", f"{r['lr']:g}", r["batch"], r["epochs"],
            f"{r['clean10k']:.3f}", f"{r['fgsm0.05']:.3f}", f"{r['pgd0.05']:.3f}", f"{r['fgsm0.1']:.3f}", f"{r['pgd0.1']:.3f}",
            f"{r['alpha10_100']:.2f}", f"{r['alpha10_N']:.2f}", r["d90"], f"{r['pr']:.1f}", f"{r['Rtrue']:.2f}", f"{r['tail_gap']:.0f}", pen, f"{r['gradL1']:.1f}"]
    print("| " + " | ".join(str(v) for v in vals) + " |")
