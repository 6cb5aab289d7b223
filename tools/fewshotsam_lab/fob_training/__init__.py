"""Self-supervised training of the FoB prompt generator (``python tools/lab.py train-fob``): supervoxel
pseudo-label episodes, losses, the training loop and its calibration. The network and what inference needs
(ring points, presence features) are in the library: ``FewShotSAMLib/fob/model.py`` and
``FewShotSAMLib/fob/inference.py``."""
