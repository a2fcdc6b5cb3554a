"""Build hook for the optional C extension; all other metadata is in pyproject.toml.

dcformat._huffcode is the fast canonical Huffman coder. It is optional: where it cannot be
compiled the install still succeeds and dcformat.huffman uses its bitarray coder instead.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "dcformat._huffcode",
            sources=["dcformat/_huffcode.c"],
            optional=True,  # no compiler -> pure-Python install, same results, slower
        )
    ]
)
