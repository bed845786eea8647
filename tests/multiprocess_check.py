"""One of two local JAX processes (4 simulated CPU devices each) that load the fixture checkpoint sharded across
both and generate greedily; prints the tokens from process 0.
    python -m tests.multiprocess_check CHECKPOINT FIXTURE_DIR PORT PROCESS_ID"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402

import af2_jax  # noqa: E402
from af2_jax.distributed import is_main_process, maybe_initialize_distributed  # noqa: E402
from af2_jax.generate import generate  # noqa: E402
from af2_jax.sharding import make_mesh  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def main(checkpoint, fixture, port, process_id):
    assert maybe_initialize_distributed(f"127.0.0.1:{port}", 2, int(process_id))
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = make_mesh("data=2,tensor=4")
    model = af2_jax.load(checkpoint, dtype="float32", mesh=mesh)
    i = dict(np.load(os.path.join(fixture, "inputs.npz")))
    out = generate(model, i["gen_input_ids"], i["gen_attention_mask"], i["audio_x"], i["audio_x_mask"],
                   max_new_tokens=8, mesh=mesh)
    if is_main_process():
        print("TOKENS", out.tokens.tolist(), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
