"""FewShotSAMLib: segment a whole CT/MRI volume from one painted slice with SAM.

The library never imports slicer, qt or vtk. Heavy dependencies (torch, SimpleITK) are imported lazily
by the modules that need them so that ``python -m FewShotSAMLib --help`` starts fast.
"""

__version__ = "0.1.0"
