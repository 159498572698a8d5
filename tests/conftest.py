import os

from hypothesis import HealthCheck, settings

import jfactor  # noqa: F401  (switches on float64 before any array is made)

settings.register_profile(
    "default",
    max_examples=int(os.environ.get("JFACTOR_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("default")
