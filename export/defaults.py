"""Training defaults, import-light (no torch) so the CLI's ``--help`` can show them.

``DIGITS_DEMO`` is the setting ``make demo`` trains: a 48-bit DLHEIR at 64x64 from random
initialization on the bundled digits. Measured on the 2-core development machine (shared with
other work): about 45 s per epoch, 6 epochs, P@20 about 0.99 on the digits query split.
``PAPER`` is the paper's setting (Corel10K, 384x384, ImageNet weights, 200 epochs).
"""

DIGITS_DEMO = dict(bits=48, image_size=64, epochs=6, batch_size=32, lr=0.05, momentum=0.9, weights="none")
PAPER = dict(bits=48, image_size=384, epochs=200, batch_size=64, lr=0.01, momentum=0.9, weights="imagenet")
WEIGHT_DECAY = 5e-4
