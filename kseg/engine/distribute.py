"""Device placement and numeric settings for training (TF-only where it must be: tf.distribute).

TPUStrategy when a TPU is reachable, MirroredStrategy over several visible GPUs, else the default
strategy; on the JAX backend Keras' distribution API does data parallelism over local devices.
"""

from __future__ import annotations

import contextlib
import json
import os

import keras

from kseg.core.errors import ConfigError


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


STRATEGIES = ("auto", "default", "mirrored")


def is_chief() -> bool:
    """Whether this process is the chief of a multi-worker job (``TF_CONFIG``): the chief, or worker 0
    when the cluster names no chief. Without ``TF_CONFIG`` every process is its own chief."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task") or {}
    if not task:
        return True
    kind, index = task.get("type", "worker"), int(task.get("index", 0))
    if kind == "chief":
        return True
    return kind == "worker" and index == 0 and "chief" not in (config.get("cluster") or {})


def strategy_scope(strategy: str = "auto") -> tuple[contextlib.AbstractContextManager, str, int]:
    """(the strategy's scope (TF) or a null context with a data-parallel distribution set (JAX),
    a description, the number of replicas).

    ``auto``: TPUStrategy when a TPU is configured, MultiWorkerMirroredStrategy with ``TF_CONFIG``,
    MirroredStrategy over two or more GPUs, else the default. ``default`` forces one device;
    ``mirrored`` forces MirroredStrategy over every GPU, or over every logical CPU device when there
    is no GPU (how the multi-replica path is exercised on one CPU machine).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"train.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        devices = jax.devices()
        if strategy == "default":
            devices = devices[:1]
        if len(devices) > 1:
            keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        return contextlib.nullcontext(), f"jax data-parallel over {len(devices)} device(s)", len(devices)
    if backend != "tensorflow":
        return contextlib.nullcontext(), f"{backend} default device", 1
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if strategy == "mirrored":
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        mirrored = tf.distribute.MirroredStrategy(devices)
        kind = "GPUs" if gpus else "CPU devices"
        return mirrored.scope(), f"MirroredStrategy over {len(devices)} {kind}", mirrored.num_replicas_in_sync
    if strategy == "auto" and (os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR")):
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        tpu = tf.distribute.TPUStrategy(resolver)
        return tpu.scope(), f"TPUStrategy ({tpu.num_replicas_in_sync} cores)", tpu.num_replicas_in_sync
    if strategy == "auto" and os.environ.get("TF_CONFIG"):
        workers = tf.distribute.MultiWorkerMirroredStrategy()
        replicas = workers.num_replicas_in_sync
        return workers.scope(), f"MultiWorkerMirroredStrategy ({replicas} replicas)", replicas
    if strategy == "auto" and len(gpus) > 1:
        mirrored = tf.distribute.MirroredStrategy()
        return mirrored.scope(), f"MirroredStrategy over {len(gpus)} GPUs", mirrored.num_replicas_in_sync
    device = "GPU" if gpus else "CPU"
    return tf.distribute.get_strategy().scope(), f"default strategy ({device})", 1
