"""Fast settings for every detector, used by the shared check suite (test_shared_checks.py).

A detector module registers itself here with the settings that keep its checks to seconds on CPU.
"""

FAST_SETTINGS = {
    "padim": dict(image_size=96, n_features=40),
    "patchcore": dict(image_size=96, coreset_fraction=0.1),
    "siamese": dict(image_size=48, epochs=8, batch_size=16),
    "triplet": dict(image_size=48, epochs=8, batch_size=16),
    "classifier-embedding": dict(image_size=48, epochs=8, batch_size=16),
    "cnn-classifier": dict(image_size=96, epochs=15),
}
FAST_SETTINGS["patch-metric"] = dict(image_size=96, epochs=3, steps_per_epoch=20, coreset_fraction=0.1)

#: new options of a detector pass the same checks: label -> (detector name, settings)
VARIANTS = {name: (name, settings) for name, settings in FAST_SETTINGS.items()}
VARIANTS.update({
    "padim[gaussian=shared,n_features=0]": ("padim", dict(image_size=96, n_features=0, gaussian="shared")),
    "padim[backbone=lite1,stages=1,2,3]": ("padim", dict(image_size=96, backbone="lite1", stages=(1, 2, 3),
                                                         n_features=40)),
    "patchcore[stages=1,2,4]": ("patchcore", dict(image_size=96, stages=(1, 2, 4), coreset_fraction=0.05)),
    "patchcore[backbone=lite2]": ("patchcore", dict(image_size=96, backbone="lite2", coreset_fraction=0.1)),
    # the memory selected on a pre-sample (fewer than the training patches: 12 x 12 per image)
    "patch-metric[coreset_sample=1000]": ("patch-metric", dict(FAST_SETTINGS["patch-metric"], coreset_sample=1000)),
    "patch-metric[backbone=lite2]": ("patch-metric", dict(FAST_SETTINGS["patch-metric"], backbone="lite2")),
    "patch-metric[init=rca]": ("patch-metric", dict(FAST_SETTINGS["patch-metric"], init="rca")),
    # fitted with labelled defects too (WITH_DEFECTS): the supervised head, on frozen or tuned features
    "patch-metric[head=auto]": ("patch-metric", dict(FAST_SETTINGS["patch-metric"], head_steps=100)),
    "patch-metric[head_features=tuned]": ("patch-metric", dict(FAST_SETTINGS["patch-metric"], head_features="tuned",
                                                                tune_steps=30)),
})

#: variants that the shared checks fit on labelled defective images as well as the goods (as the
#: supervised detectors), so that what they learn from the defects is checked too
WITH_DEFECTS = {"patch-metric[head=auto]", "patch-metric[head_features=tuned]"}

