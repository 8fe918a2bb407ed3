"""Spoken language modelling on discrete units: unit LMs, ZeroSpeech-2021 scoring and the correlation study.

The modules follow the data: ``tokens`` (unit files → token sequences) → ``models`` (LSTM / GPT unit LMs) →
``train`` (``spidr lm-train``) → ``score`` (``spidr lm-score``: per-item log-likelihoods, ZeroSpeech submission
files; ``score_units`` for items in memory) → ``zerospeech`` (gold and submission formats) → ``evaluate``
(``spidr lm-eval``: pair accuracies exactly as the ZeroSpeech 2021 toolkit; ``pair_accuracy`` for pairs in memory)
→ ``correlate`` (``spidr lm-correlate``: unit quality vs LM accuracy).
"""
