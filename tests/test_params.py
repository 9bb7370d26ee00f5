"""params.py: Orbax save and load of flat named arrays."""

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax.params import ParamSpec, load_params, save_params


def test_save_and_load_at_a_relative_path(tmp_path, monkeypatch):
    """A folder named relative to the working directory (as a user types `--out runs/x`) saves and
    loads back (Orbax itself takes absolute paths only)."""
    monkeypatch.chdir(tmp_path)
    arrays = {"a.w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "b": jnp.ones(4, jnp.int32)}
    save_params("runs/x/params", [{"a.w": arrays["a.w"]}, {"b": arrays["b"]}])
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    specs = {name: ParamSpec(x.shape, x.dtype, ("embed",) * x.ndim) for name, x in arrays.items()}
    got = load_params("runs/x/params", specs, {name: device for name in arrays})
    for name, x in arrays.items():
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(x))
