"""Batched robustness evaluation: FGSM, PGD and white noise over a whole epsilon grid at once.

PGD and FGSM curves count a sample as fooled at eps when any example the attack found within
the eps-ball fools it (early retirement, nested balls; ``final_iterate=True`` for the plain
loop's rule). See :mod:`powerlaw_fast.attacks.pgd`.

>>> import torch
>>> from powerlaw_fast.attacks import robustness_curve
>>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
>>> x, y = torch.rand(10, 1, 4, 4), torch.randint(0, 3, (10,))
>>> curve = robustness_curve(model, (x, y), [0.0, 0.1, 0.2], attack="pgd", steps=5,
...                          progress=False)
>>> len(curve.accuracy)
3
"""

from powerlaw_fast.attacks.curve import RobustnessCurve, robustness_curve
from powerlaw_fast.attacks.fgsm import fgsm
from powerlaw_fast.attacks.noise import white_noise
from powerlaw_fast.attacks.pgd import AttackResult, pgd

__all__ = ["AttackResult", "RobustnessCurve", "fgsm", "pgd", "robustness_curve", "white_noise"]
