"""The paper's tooling (Nassar et al., NeurIPS 2020, sec. 4), apart from the library.

- :mod:`.models`: the shallow net, MLP and CNN; :mod:`.whitening`: the whitened layer
- :mod:`.datasets`: MNIST (a folder, ``$POWERLAW_FAST_DATA`` or the shipped subset in ``data/``)
- :mod:`.jacobian`: the Jacobian penalty baseline; :mod:`.sensitivity`: sensitivity maps
- :mod:`.experiments`: one run, sweeps, the demo (:mod:`.experiments.demo`)
- :mod:`.plots`: the figures and tables from the run JSONs
"""
