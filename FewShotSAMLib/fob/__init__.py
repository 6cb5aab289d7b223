"""FoB (Focus on Background): the background-prompt network on frozen SAM embeddings (``model.py``) and
what its inference needs besides (``inference.py``); reached through ``prompts/fob.py``. The shipped
weights are package data (``weights/``). Its self-supervised training is research tooling:
``tools/fewshotsam_lab/fob_training/`` (``python tools/lab.py train-fob``)."""
