"""Every test sees 8 simulated CPU devices; set before JAX is imported anywhere. A persistent
compilation cache (inherited by the subprocesses and notebook kernels the tests start) saves
recompiling the same tiny models in every test. Every test leaves the global gin config cleared
(parse_gin locks it) for whatever runs next."""
import os
import tempfile

import gin
import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "moe_jax_test_jit_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1.0")


@pytest.fixture(autouse=True)
def _clear_gin():
  yield
  gin.clear_config()
