"""Builds fastattn._C: the C++ CPU kernels always; CUDA sources where nvcc and a CUDA torch exist."""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern), recursive=True))


def extension():
    cxx = ["-O3", "-g0", "-std=c++17", "-fopenmp"]  # -g0: Python's own CFLAGS ask for debug info (a third of the build)
    cpp = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    cuda = sources("csrc/cuda/*.cu") + sources("csrc/cuda/*.cpp")
    with_cuda = bool(cuda) and torch.version.cuda is not None and CUDA_HOME is not None
    if os.environ.get("FASTATTN_NO_CUDA") == "1":
        with_cuda = False
    if not with_cuda:
        return CppExtension("fastattn._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    # sm_80 and sm_90a by default (-gencode=arch=compute_90a,code=sm_90a); torch turns the
    # list into -gencode flags. Override with FASTATTN_CUDA_ARCHS, e.g. "8.6" or "9.0a".
    os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("FASTATTN_CUDA_ARCHS", "8.0;9.0a")
    return CUDAExtension(
        "fastattn._C",
        cpp + cuda,
        define_macros=[("FASTATTN_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="fastattn",
    version="0.1.0",
    description="Fused scaled-dot-product attention for PyTorch: masks in the kernel, O(N) memory",
    packages=find_packages(include=["fastattn", "fastattn.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.11"],  # 2.11 ran on the GPU check, 2.13 runs in CI
    extras_require={"transformers": ["transformers>=5.17"]},  # CI tests 5.17 and the newest (5.25)
    package_data={"fastattn": ["triton/tuned/*.json", "backends/tables/*.json", "gluon/*.json"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
