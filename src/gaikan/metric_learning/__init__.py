"""Metric learning: embedding nets, pair/triplet sampling and mining, losses, the training loop.

    nets.py      MLPNet, SmallCNN, EfficientNetHead, build_net
    sampling.py  synthetic_negatives, class_means, sample_pairs, sample_triplets, mine_batch_hard, mine_semi_hard
    losses.py    distance, pairwise_distance, contrastive_loss, triplet_loss
    training.py  TrainSettings, train_network, augment_batch

The detectors built on them live in gaikan.detectors (siamese, triplet, classifier-embedding).
Formulas: docs/metric_learning.md.
"""
