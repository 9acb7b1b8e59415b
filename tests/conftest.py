"""Test-wide setup: 8 fake CPU devices for sharding tests, fp32 matmuls for parity checks,
and a persistent XLA compilation cache shared by every test process."""

import os
from pathlib import Path

# Must happen before jax is imported anywhere: gives 8 host devices even without CI's XLA_FLAGS.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The persistent compilation cache, set through the environment so that the xdist workers and
# the processes the tests start (`python -m jaxdetox.cli run ...`, the multi-process tests)
# share it: a program compiled once (a train step, a sampler) is loaded, not recompiled, by
# every later process that builds it. The key covers the program, the devices, XLA_FLAGS and
# the jax version, so a stale entry is only a miss. The size limit turns on the cache's file
# lock, so no process reads an entry another is still writing. Set JAX_COMPILATION_CACHE_DIR
# to move it, JAX_ENABLE_COMPILATION_CACHE=false to turn it off.
_CACHE_DIR = Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax_compilation_cache"
for _name, _value in {
    "JAX_COMPILATION_CACHE_DIR": str(_CACHE_DIR),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.1",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(4 << 30),
}.items():
    os.environ.setdefault(_name, _value)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `pytest -n N --dist loadgroup`: the tests of a module that share one of its
    module-scoped fixtures (a finished run, a loaded model) run on one worker, so that fixture
    is built once; every other test goes to whichever worker is free."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs.values() if info else ()
        if any(d and d[-1].scope != "function" and d[-1].baseid for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
