"""Ray Tune + Optuna sweeps over XSwinIR training configs (``xswinir tune``).

``search_space`` maps dotted config keys to domains and checks them against the config; ``sweep`` runs the
Tuner (a Ray Train run per trial, Optuna TPE, ASHA) and exports trials.parquet, plots and best_config.yaml.
"""
