"""fewshotsam_lab: the research tooling of FewShotSAM (evaluation harness, click and speed benchmarks, FoB
and point-decoder training, demo), kept apart from the library a clinician installs (``FewShotSAMLib``).

Run through ``python tools/lab.py COMMAND``; tests import it with ``tools/`` on ``sys.path``. Nothing in
``FewShotSAMLib`` imports this package.
"""
