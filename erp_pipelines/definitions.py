"""The one Definitions object (`dagster dev`, `dagster asset materialize -m erp_pipelines.definitions`).

Which ERPs are enabled and where the warehouse lives come from the environment (`config.py`).
"""

import os

from erp_pipelines.defs.build import build_definitions

defs = build_definitions(os.environ)
