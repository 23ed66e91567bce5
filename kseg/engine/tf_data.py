"""TF-only: feed batches whose image size varies from batch to batch (whole-image validation).

On the TensorFlow backend Keras turns a PyDataset into a ``tf.data`` pipeline whose shapes it
infers from the first two batches; when those happen to share a size (most DSB 2018 images are
256x256), a later 256x320 image is rejected. Here the signature leaves batch, height and width
unknown. Other backends iterate the batches as NumPy and need nothing.
"""

from __future__ import annotations

import keras
import numpy as np


def variable_size_input(batches: keras.utils.PyDataset):
    """``batches`` as ``model.fit`` / ``evaluate`` input that accepts any image size per batch."""
    if keras.backend.backend() != "tensorflow":
        return batches
    import tensorflow as tf

    def spec(array: np.ndarray) -> tf.TensorSpec:
        array = np.asarray(array)
        shape = (None, None, None, *array.shape[3:]) if array.ndim == 4 else (None, *array.shape[1:])
        return tf.TensorSpec(shape=shape, dtype=tf.as_dtype(array.dtype))

    signature = tf.nest.map_structure(spec, batches[0])
    if isinstance(signature, list):
        signature = tuple(signature)

    def generate():
        for index in range(len(batches)):
            yield batches[index]

    # A known length lets Keras size the validation loop instead of running into the end of the
    # data (which it reports as a warning on the first epoch).
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    return dataset.apply(tf.data.experimental.assert_cardinality(len(batches))).prefetch(2)
