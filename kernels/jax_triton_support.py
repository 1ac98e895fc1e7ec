"""Whether jax_triton imports here (the JAX bindings' GPU path), shared by the kernels and their callers."""

import functools
import os


@functools.cache
def has_jax_triton() -> bool:
    # jax_triton sets TRITON_CACHE_DIR="" on import, which breaks every later
    # torch-side Triton compile in the process ("Could not create or locate
    # cache dir"); it compiles through its own path, so put the variable back.
    saved = os.environ.get("TRITON_CACHE_DIR")
    try:
        import jax_triton  # noqa: F401
    except Exception:  # absent, or built against another jax
        return False
    finally:
        if saved is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = saved
    return True
