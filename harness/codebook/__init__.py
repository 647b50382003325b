"""The language-feedback redundancy codebook (METHODS.md §1; arXiv 2503.20540).

probes.py    the three probes per token (single-input p_max, local and global leave-one-out JSD)
jsd.py       the official and the textbook Jensen-Shannon divergence
dpc.py       DPC-KNN clustering and the two selection stages
build.py     labels, thresholds, `harness codebook build`
files.py     the codebook file format (the release's, plus our build record)
analyze.py   `harness codebook analyze`: language-feedback redundancy against [CLS] and attention
"""
