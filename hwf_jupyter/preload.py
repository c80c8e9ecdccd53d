"""The extension name for an IPython profile that preloads HWF (``make lab``).

``c.InteractiveShellApp.extensions = ["hwf_jupyter.preload"]`` registers the
magics at kernel start.  IPython tracks extensions by name, so a notebook's
own ``%load_ext hwf_jupyter`` then still calls HWF's loader, which finds the
magics registered and returns quietly, instead of IPython printing "The
hwf_jupyter extension is already loaded" (what preloading ``hwf_jupyter``
itself made every shipped notebook print).
"""

from . import load_ipython_extension, unload_ipython_extension

__all__ = ["load_ipython_extension", "unload_ipython_extension"]
