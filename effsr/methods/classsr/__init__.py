"""ClassSR (Kong et al., CVPR 2021) — user guide: docs/classsr.md; specification: docs/methods/classsr.md."""

from effsr.methods.classsr.module import *  # noqa: F403 - the package's surface during the move
from effsr.methods.classsr.module import (  # noqa: F401 - private names tests and benchmarks reached
    _meta_macs,
    _meta_macs_720p,
)
