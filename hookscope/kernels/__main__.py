"""``python -m hookscope.kernels [--out DIR]``: rebuild the native kernels in place (after editing the C sources,
or after installing a compiler), then say what hookscope uses."""

from __future__ import annotations

import sys

from hookscope.kernels.build import main

if __name__ == "__main__":
    code = main()
    if code == 0 and len(sys.argv) == 1:
        from hookscope import kernels

        print(kernels.info())
    sys.exit(code)
