"""rdax-fastpath: the native post-and-poll of rdax's Connection (rdax_fastpath.pyx), built where pyverbs lives.

Built with Debian's cython3, gcc and libibverbs-dev, without build isolation (the lab root, the image's build
stage): pip install --no-build-isolation rdma/fastpath
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    name="rdax-fastpath",
    version="0.1.0",
    description="rdax's native post-and-poll on pyverbs' QP and CQ",
    ext_modules=cythonize(
        [Extension("rdax_fastpath", ["rdax_fastpath.pyx"], libraries=["ibverbs"])],
        include_path=["pxd"],
        compiler_directives={"language_level": 3},
    ),
    zip_safe=False,
)
