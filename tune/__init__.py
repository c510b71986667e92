"""Ray Tune + Optuna sweeps and studies over XSwinIR training configs (``xswinir tune``, ``xswinir study``).

This folder is installed as the package ``xswinir.tune`` (``pyproject.toml`` maps it), so that installing
XSwinIR adds no top-level module named ``tune``; import it as ``xswinir.tune.*``.

``search_space`` maps dotted config keys to domains and checks them against the config; ``sweep_config`` reads
a sweep YAML; ``sweep`` runs the Tuner (a Ray Train run per trial, Optuna TPE, ASHA); ``results`` and ``plots``
export trials.parquet, best_config.yaml and the pictures; ``manifest`` guards ``--resume`` against tampered
pickles; ``study`` runs the controlled multi-seed comparison.
"""
