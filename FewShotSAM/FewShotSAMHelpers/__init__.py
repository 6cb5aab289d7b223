"""The MRML side of the "Segment from one example" module, without Qt.

Everything of the module that touches the MRML scene lives in this package so that it runs (and is
tested) both in 3D Slicer and headless with the ``slicer-core`` wheel. One file per job:

- ``dependencies``: the Python version check and the installation of the packages the library needs;
- ``geometry``: volume node <-> numpy array and numpy index <-> RAS;
- ``labelmaps``: segment <-> mask, whole or slice by slice (in place where possible);
- ``markups``: prompts <-> markups point lists, and the lists the place-point buttons fill;
- ``editing``: the re-run of one slice when the user edits a prompt point, and undo;
- ``logic``: the worker that runs the engine, the console batch API (``SegmentFromExampleLogic``).

Index conventions: arrays are in numpy order ``(a0, a1, a2) = (k, j, i)`` (``slicer.util.arrayFromVolume``
order, the library's order); a volume node's IJKToRAS matrix has its columns in ``(i, j, k)`` order.
Only the scene a node belongs to is used (``node.GetScene()``), never a global scene, so the helpers work
on any ``vtkMRMLScene``.

This is a helper package, not a module: Slicer registers only the top-level ``.py`` files of a module
folder as modules, and the build installs this folder beside the module (``WITH_SUBDIR``).
"""

import os
import sys


def _make_library_importable() -> None:
    """From the source tree the library is the module folder's sibling; when built it is installed beside
    this package. Add whichever folder holds it to sys.path when it is not importable yet."""
    try:
        import FewShotSAMLib  # noqa: F401 - only checks that it is importable
        return
    except ImportError:
        pass
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder in (here, os.path.dirname(here)):
        if os.path.isdir(os.path.join(folder, "FewShotSAMLib")):
            sys.path.insert(0, folder)
            return


_make_library_importable()
