"""Device placement and numeric settings for training (TF-only where it must be: tf.distribute).

TPUStrategy when a TPU is reachable, MirroredStrategy over several visible GPUs, else the default
strategy; on the JAX backend Keras' distribution API does data parallelism over the devices of one
process or of several (a multi-host job: ``KERAS_DISTRIBUTION_*``, each process feeding its own
rows of every global batch). MultiWorkerMirroredStrategy is refused: see ``MULTI_WORKER_TF``.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import keras
import numpy as np

from kseg.core.errors import ConfigError
from kseg.core.fileio import atomic_write_bytes


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and the backend; with ``deterministic`` also make TF ops deterministic."""
    keras.utils.set_random_seed(seed)
    if deterministic and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


STRATEGIES = ("auto", "default", "mirrored")
MULTI_WORKER_TF = (
    "TF_CONFIG names a cluster of several workers, but MultiWorkerMirroredStrategy cannot train Keras 3 models: "
    "Keras' fit reduces each input batch across workers and fails (keras-team/keras#20585), and the fixes reach "
    "into Keras internals. Train on several hosts on the JAX backend instead: KERAS_BACKEND=jax with "
    "KERAS_DISTRIBUTION_JOB_ADDRESSES, KERAS_DISTRIBUTION_NUM_PROCESSES and KERAS_DISTRIBUTION_PROCESS_ID set on "
    "every host (README, \"Beyond one machine\"), and unset TF_CONFIG")


# Keras' own variables for a multi-process job on the JAX backend (``keras.distribution.initialize``).
PROCESS_VARIABLES = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                     "KERAS_DISTRIBUTION_PROCESS_ID")


def process_count_requested() -> int:
    """How many processes ``KERAS_DISTRIBUTION_NUM_PROCESSES`` asks for (1 when unset)."""
    value = os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "").strip()
    if not value:
        return 1
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"KERAS_DISTRIBUTION_NUM_PROCESSES={value!r} must be a positive whole number")
    return int(value)


def initialize_processes() -> None:
    """Join a multi-process job when ``KERAS_DISTRIBUTION_*`` ask for one (every process runs the
    same ``kseg train``; see the README's multi-host recipe). Must run before anything touches the
    JAX backend; a no-op for one process."""
    if process_count_requested() == 1:
        return
    backend = keras.backend.backend()
    if backend != "jax":
        raise ConfigError(f"KERAS_DISTRIBUTION_NUM_PROCESSES is set but the Keras backend is {backend}: "
                          "multi-process training runs on KERAS_BACKEND=jax")
    missing = [name for name in PROCESS_VARIABLES if not os.environ.get(name)]
    if missing:
        raise ConfigError(f"a multi-process job needs {', '.join(missing)} set as well (every process: the "
                          "coordinator's host:port, the process count, its own index 0..n-1)")
    import jax

    if not jax.distributed.is_initialized():
        keras.distribution.initialize()  # reads the KERAS_DISTRIBUTION_* variables


def is_chief() -> bool:
    """Whether this process is the chief of a multi-worker job: process 0 of a JAX multi-process job
    (``KERAS_DISTRIBUTION_PROCESS_ID``), or with ``TF_CONFIG`` the chief, or worker 0 when the
    cluster names no chief. Otherwise every process is its own chief."""
    if process_count_requested() > 1:
        return os.environ.get("KERAS_DISTRIBUTION_PROCESS_ID", "0").strip() == "0"
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

    ``auto``: TPUStrategy when a TPU is configured, MirroredStrategy over two or more GPUs, else
    the default; a multi-worker ``TF_CONFIG`` is refused (``MULTI_WORKER_TF`` says why and what to
    use). On JAX: ``DataParallel`` over every device of every process of the job. ``default`` forces one device;
    ``mirrored`` forces MirroredStrategy over every GPU, or over every logical CPU device when there
    is no GPU (how the multi-replica path is exercised on one CPU machine).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"train.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        devices = jax.devices()  # every process's, in a multi-process job
        processes = jax.process_count()
        if strategy == "default" and processes == 1:
            devices = devices[:1]
        if len(devices) > 1:
            parallel = keras.distribution.DataParallel(devices=devices)
            # Each process feeds its own rows of every global batch (kseg.data.generator.process_shard);
            # Keras' auto-sharding handles tf.data input only.
            parallel.auto_shard_dataset = False
            keras.distribution.set_distribution(parallel)
        where = f" in {processes} processes" if processes > 1 else ""
        return contextlib.nullcontext(), f"jax data-parallel over {len(devices)} device(s){where}", len(devices)
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
        cluster = (json.loads(os.environ["TF_CONFIG"]).get("cluster") or {}).values()
        if sum(len(tasks) for tasks in cluster) > 1:
            raise ConfigError(MULTI_WORKER_TF)
    if strategy == "auto" and len(gpus) > 1:
        mirrored = tf.distribute.MirroredStrategy()
        return mirrored.scope(), f"MirroredStrategy over {len(gpus)} GPUs", mirrored.num_replicas_in_sync
    device = "GPU" if gpus else "CPU"
    return tf.distribute.get_strategy().scope(), f"default strategy ({device})", 1


def process_count() -> int:
    """Processes in this training job (more than one only for a multi-process JAX job)."""
    if keras.backend.backend() != "jax":
        return 1
    import jax

    return jax.process_count()


def broadcast_from_chief(data: bytes) -> bytes:
    """Process 0's ``data`` in every process of a multi-process JAX job (``data`` itself otherwise):
    how the other processes get what only the chief's run folder holds."""
    if process_count() == 1:
        return data
    from jax.experimental import multihost_utils

    size = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
    buffer = np.frombuffer(data, np.uint8) if len(data) == size else np.zeros(size, np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer)))


def share_chief_file(path: Path) -> None:
    """Give every process of a multi-process job the chief's copy of ``path`` (a checkpoint in the
    run folder, which the others hold a scratch copy of): loading a model assigns its variables,
    a collective operation every process must make with the same values."""
    if process_count() == 1:
        return
    import jax

    data = broadcast_from_chief(path.read_bytes() if jax.process_index() == 0 and path.is_file() else b"")
    if jax.process_index() != 0:
        if data:
            atomic_write_bytes(path, data)
        else:
            path.unlink(missing_ok=True)
