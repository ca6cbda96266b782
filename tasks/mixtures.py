"""Imports every task collection, registering the synthetic benchmark.

The collections that read local files register through functions, since their data lives on the
user's machine: `tasks.t0.register_t0` (``DataConfig.t0_data_dir`` or ``$MHR_DATA_DIR``) and
`tasks.super_ni.register_super_ni` (``DataConfig.super_ni_dir`` or ``$MHR_SUPER_NI_DIR``), whose
other arguments gin configures (they are imported here so that gin knows them before it parses),
and `tasks.p3.register_p3`, the T0 training mixture ``p3_t0_train``, registered here when
``$MHR_P3_DIR`` names a P3 directory.
"""

import os

from tasks import p3, super_ni, synthetic, t0  # noqa: F401  (synthetic registers at import)

if os.environ.get(p3.DATA_DIR_ENV):
  p3.register_p3()
