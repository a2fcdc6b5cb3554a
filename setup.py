"""Build hook for the optional C extensions; all other metadata is in pyproject.toml.

dcformat._huffcode is the fast canonical Huffman coder and dcformat._ranscode the fast rANS coder. Both are
optional: where they cannot be compiled the install still succeeds and dcformat.huffman / dcformat.rans use
their fallback coders instead.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "dcformat._huffcode",
            sources=["dcformat/_huffcode.c"],
            optional=True,  # no compiler -> pure-Python install, same results, slower
        ),
        Extension(
            "dcformat._ranscode",
            sources=["dcformat/_ranscode.c"],
            optional=True,  # no compiler -> the Python reference coder in dcformat/rans.py, same bytes, slower
        ),
    ]
)
