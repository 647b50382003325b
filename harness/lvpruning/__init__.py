"""Training LVPruning's decision modules (methods/lvpruning.py, METHODS.md §4) on a frozen LLaVA model.

`masked`: the language model's forward with the modules inserted, tokens masked instead of dropped (the
paper's training form: a policy inside every attention softmax, original positions kept), so the loss reaches
the decisions. `train`: the seeded, resumable trainer on the testbed's train split (`harness lvpruning train`).
The trained file is read at inference by `methods.lvpruning`, which drops the tokens through the shared adapter.
"""
