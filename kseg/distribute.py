"""Device placement and numeric settings for training (TF-only where it must be: tf.distribute).

TPUStrategy when a TPU is reachable, MirroredStrategy over several visible GPUs, else the default
strategy; on the JAX backend Keras' distribution API does data parallelism over local devices.
"""

from __future__ import annotations

import contextlib
import os

import keras


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and the backend; with ``deterministic`` also make TF ops deterministic."""
    keras.utils.set_random_seed(seed)
    if deterministic and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def set_mixed_precision(enabled: bool) -> str:
    """float16 compute on GPUs, bfloat16 elsewhere (CPU/TPU); float32 when disabled."""
    if not enabled:
        policy = "float32"
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        policy = "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
    else:
        policy = "mixed_bfloat16"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def strategy_scope():
    """A context manager: the strategy's scope (TF) or a data-parallel distribution (JAX)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        devices = jax.devices()
        if len(devices) > 1:
            keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        return contextlib.nullcontext(), f"jax data-parallel over {len(devices)} device(s)"
    if backend != "tensorflow":
        return contextlib.nullcontext(), f"{backend} default device"
    import tensorflow as tf

    if os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR"):
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        strategy = tf.distribute.TPUStrategy(resolver)
        return strategy.scope(), f"TPUStrategy ({strategy.num_replicas_in_sync} cores)"
    if os.environ.get("TF_CONFIG"):
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        return strategy.scope(), f"MultiWorkerMirroredStrategy ({strategy.num_replicas_in_sync} replicas)"
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        strategy = tf.distribute.MirroredStrategy()
        return strategy.scope(), f"MirroredStrategy over {len(gpus)} GPUs"
    device = "GPU" if gpus else "CPU"
    return tf.distribute.get_strategy().scope(), f"default strategy ({device})"
