"""Analysis of models and trained weights: evaluation of any weights file, the paper's parameter
figures beside our counts, activation maximisation."""
