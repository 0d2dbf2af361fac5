"""The experiments of Nassar et al. (2020), section 4: one run = train, evaluate, write one JSON.

A run is described by a :class:`RunConfig`; :func:`run_experiment` builds the model, trains it
(optionally with the spectral regulariser, the Jacobian penalty or a whitened layer), evaluates
clean accuracy and FGSM / PGD / white-noise robustness, measures the hidden layers' eigenspectra
and a few sensitivity maps, and writes everything to one JSON atomically. :func:`run_sweep` runs
many configs into a folder and resumes an interrupted sweep, also under ``torchrun``.

The modules, in the order a run uses them:

- :mod:`.config`: :class:`RunConfig`, the experiments' variants, :func:`sweep_configs`
- :mod:`.build`: the MNIST splits in memory (:func:`load_data`), the network, its
  regularised layers and batch size (:func:`build_model`)
- :mod:`.training`: :func:`train_model`
- :mod:`.parallel`: data-parallel training under ``torchrun`` (:class:`DataParallel`)
- :mod:`.evaluation`: robustness curves, eigenspectra, sensitivity maps
- :mod:`.results`: atomic JSON writes, reading back complete results
- :mod:`.run`: one run (:func:`run_experiment`)
- :mod:`.sweep`: many runs, resumable (:func:`run_sweep`)
- :mod:`.estimate`: a sweep's rough duration before it starts (:func:`estimate_seconds`)
- :mod:`.summary`: a folder's runs per seed and over seeds, and the best beta per seed
  (``summary.json``: :func:`sweep_summary`, :func:`best_beta_per_seed`)
- :mod:`.demo`: the demo, a small sweep of the shallow net with its tables and figures

Example (a tiny run on the shipped MNIST subset)::

    >>> from powerlaw_fast.paper.experiments import RunConfig, load_data, run_experiment
    >>> cfg = RunConfig("shallow", "shallow", "specreg", seed=0, beta=1.0, epochs=1, width=32,
    ...                 limit_train=300, limit_test=100, fgsm_eps=(0.0, 0.1), pgd_eps=(0.1,),
    ...                 noise_sigma=(0.2,), pgd_steps=2)
    >>> result = run_experiment(cfg, load_data(None, 300, 100), progress=False)
    >>> result["status"], sorted(result["robustness"])
    ('complete', ['fgsm', 'noise', 'pgd'])
"""

from .build import Data, batch_size_for, build_model, check_runs, default_device, load_data
from .config import (
    ARCHS,
    DEFAULT_EPS,
    DEFAULT_NOISE,
    DEFAULT_RANKS,
    EXPERIMENTS,
    PRESETS,
    SPECREG_VARIANTS,
    RunConfig,
    preset_fields,
    sweep_configs,
)
from .estimate import estimate_seconds
from .evaluation import accuracy, evaluate_robustness, measure_sensitivity, measure_spectra
from .parallel import DataParallel, check_data_parallel, distributed_shard
from .results import (
    RESULT_FORMAT,
    ResultWarning,
    check_result,
    load_results,
    read_result,
    write_json_atomic,
)
from .run import run_experiment
from .summary import best_beta_per_seed, sweep_summary, write_summary
from .sweep import run_sweep, sweep_device
from .training import train_model

__all__ = [
    "ARCHS",
    "DEFAULT_EPS",
    "DEFAULT_NOISE",
    "DEFAULT_RANKS",
    "EXPERIMENTS",
    "PRESETS",
    "RESULT_FORMAT",
    "ResultWarning",
    "SPECREG_VARIANTS",
    "Data",
    "DataParallel",
    "RunConfig",
    "accuracy",
    "batch_size_for",
    "best_beta_per_seed",
    "build_model",
    "check_result",
    "check_data_parallel",
    "check_runs",
    "default_device",
    "distributed_shard",
    "estimate_seconds",
    "evaluate_robustness",
    "load_data",
    "load_results",
    "measure_sensitivity",
    "measure_spectra",
    "preset_fields",
    "read_result",
    "run_experiment",
    "run_sweep",
    "sweep_configs",
    "sweep_device",
    "sweep_summary",
    "train_model",
    "write_json_atomic",
    "write_summary",
]
